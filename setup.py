from setuptools import find_packages, setup

setup(
    name="alignment",
    version="0.1.0",
    description="JAX-native alignment research: SFT, reward modeling, DPO, PPO and GRPO on a sharded mesh.",
    packages=find_packages(include=["alignment", "alignment.*", "configs"]),
    package_data={"alignment": ["data/assets/*", "evals/assets/*", "safety/assets/*"],
                  "configs": ["constitutions/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "tensorflow-datasets>=4.9.9",
        "array-record>=0.7",
        "grain>=0.2.12",
        "tokenizers>=0.21",
        "jinja2>=3.1",
        "pyyaml>=6.0",        # constitutions (alignment.safety.constitution)
        "numpy>=1.26",
        "gguf>=0.16",
        "safetensors>=0.5",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "absl-py>=2.1",
        "etils[epath]>=1.7",  # every workdir path, so gs://... stays a URI
        "gcsfs>=2024.2",      # what etils.epath reads and writes gs:// with (orbax's arrays go through TensorStore)
        "math-verify>=0.7",   # the `math` reward: final answers compared as expressions (alignment.rl.rewards)
        "datasketch>=1.6",    # MinHash LSH for near-duplicate removal (alignment.data.filters)
        "fastapi>=0.115",     # the OpenAI-compatible server (alignment.serve)
        "uvicorn>=0.30",
        "matplotlib>=3.8",    # plots: a sweep's intervals (launch/sweep.py)
    ],
    extras_require={
        "test": ["pytest>=8", "torch==2.13.0", "transformers>=4.50", "accelerate>=1.0",
                 "gcp-storage-emulator>=2024.1", "openai>=1.40",
                 "lm-eval[api]==0.4.13", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
        "bench": ["torch==2.13.0", "transformers>=4.50", "accelerate>=1.0", "trl>=1.0", "datasets>=3.0"],
    },
)
