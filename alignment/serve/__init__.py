"""An OpenAI-compatible server over the KV-cache sampler: `python -m alignment.serve --model=...`
(`__main__`), the FastAPI app (`api`) and the batching engine (`engine`)."""
