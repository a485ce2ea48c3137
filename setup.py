from setuptools import find_packages, setup

setup(
    name="fsmis",
    version="0.1.0",
    description="SD-FSMIS and baselines for few-shot medical image segmentation, with one canonical evaluator",
    packages=find_packages(include=["fsmis", "fsmis.*"]),
    python_requires=">=3.10",
    # torch is installed first by the Makefile (torch==2.13.0, a CPU build on machines that have
    # it on disk); a range here keeps pip from pulling a second, CUDA build.
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "diffusers>=0.30",
        "transformers>=4.40",
        "safetensors>=0.4",
        "monai>=1.3",
        "nibabel>=5.0",
        "SimpleITK>=2.2",
        "scikit-image>=0.21",
        "scipy>=1.10",
        "numba>=0.59",
        "einops>=0.7",
        "tensorboard>=2.14",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "matplotlib>=3.7",
    ],
    extras_require={
        "dev": ["pytest>=7.4", "pytest-xdist>=3.3"],
        "clip": ["open_clip_torch>=2.23"],
    },
)
