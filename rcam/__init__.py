"""rcam: a learned camera codec, RAW (DNG) straight to a compact bitstream and back to sRGB."""

import warnings

from rcam import lean_imports
from rcam.errors import RcamError

lean_imports.install()  # before any rcam module imports compressai (rcam.lean_imports says why)

# compressai 1.2.8 calls torch.jit.script at import and torch 2.14 warns about it on every run; set once here,
# before any rcam module imports compressai, so the CLI's stderr carries only rcam's own messages.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)

__version__ = "0.1.0"
__all__ = ["RcamError", "__version__"]
