"""Package metadata: the version and descriptive fields.

The version is kept here once; ``emerging_optimizers.__version__`` is read from this module. The module imports
nothing, so a build script can execute it by file path without importing the package (and torch).
"""

MAJOR = 0
MINOR = 1
PATCH = 0
PRE_RELEASE = ""  # e.g. "a0", "rc1"; empty for a release

# (major, minor, patch, pre-release)
VERSION = (MAJOR, MINOR, PATCH, PRE_RELEASE)

__shortversion__ = f"{MAJOR}.{MINOR}.{PATCH}"
__version__ = __shortversion__ + PRE_RELEASE

__package_name__ = "emerging_optimizers"
__description__ = "Optimizers beyond AdamW for PyTorch: Adam-family and sign methods, Muon and its relatives."
__license__ = "Apache-2.0"
__keywords__ = "deep learning, machine learning, optimizer, muon, pytorch, torch"
__homepage__ = ""
__repository_url__ = ""
__download_url__ = ""
__contact_names__ = "emerging_optimizers contributors"
__contact_emails__ = ""
