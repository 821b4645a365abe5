"""rcam: a learned camera codec, RAW (DNG) straight to a compact bitstream and back to sRGB."""

from rcam.errors import RcamError

__version__ = "0.1.0"
__all__ = ["RcamError", "__version__"]
