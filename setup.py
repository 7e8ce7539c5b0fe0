"""Install tf_linntk."""

import pathlib
import re

from setuptools import find_packages, setup

_ROOT = pathlib.Path(__file__).parent
_VERSION = re.search(
    r'^__version__ = "([^"]+)"',
    (_ROOT / "tf_linntk" / "__init__.py").read_text(),
    re.MULTILINE,
).group(1)

_PLOTS_AND_DATA = ["scikit-learn>=1.3", "scipy>=1.10", "matplotlib>=3.7"]

setup(
    name="tf_linntk",
    version=_VERSION,
    description=(
        "Fast adaptation of trained Keras networks by Bayesian inference on "
        "their linearization (finite neural tangent kernel)."
    ),
    long_description=(_ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["tf_linntk", "tf_linntk.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16",
        "tensorflow-probability[tf]>=0.24",
        "keras>=3.3",
        "numpy>=1.26",
    ],
    extras_require={
        "test": ["pytest>=8", "ruff>=0.4", *_PLOTS_AND_DATA],
        "examples": _PLOTS_AND_DATA,
    },
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
