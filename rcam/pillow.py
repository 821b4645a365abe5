"""A Pillow plugin for .rcb files: `import rcam.pillow`, then `Image.open("photo.rcb")` decodes it.

Opening reads and checks the container only (size, mode and metadata are known at once); the pixels are
decoded on first access, with the model named in the file (a shipped model from weights/, or one given to
use_model). The capture metadata is exposed as Pillow's JPEG plugin does: info["exif"] (b"Exif\\0\\0" and the
EXIF block, so getexif() works), info["xmp"] and info["icc_profile"] (sRGB). Orientation reads 1: the
decoded pixels are already upright.

Pillow discovers plugins only by import (it has no entry-point mechanism), so this module registers itself
when imported.
"""

from __future__ import annotations

import threading

from PIL import Image, ImageFile

from rcam.codec import container
from rcam.codec.engine import decode_bytes
from rcam.codec.metadata import Metadata, upright
from rcam.codec.output import quantize, srgb_icc_profile
from rcam.codec.zoo import Codec, load_codec
from rcam.errors import RcamError

FORMAT = "RCB"
_codecs: dict[str, Codec] = {}
_lock = threading.Lock()
device = "cpu"  # where models loaded by the plugin run


def use_model(name_or_path: str) -> Codec:
    """Load a model (manifest name or .safetensors file) for files that name it; returns the Codec."""
    codec = load_codec(name_or_path, device)
    with _lock:
        _codecs[codec.name] = codec
    return codec


def _codec_for(name: str) -> Codec:
    with _lock:
        codec = _codecs.get(name)
    return codec if codec is not None else use_model(name)


def _accept(prefix: bytes) -> bool:
    return prefix.startswith(container.MAGIC)


class RcbImageFile(ImageFile.ImageFile):
    """An .rcb bitstream as a Pillow image (RGB, 8 bits per sample)."""

    format = FORMAT
    format_description = "rcam learned camera codec bitstream"

    def _open(self) -> None:
        data = self.fp.read()
        try:
            header, _ = container.read(data)
        except RcamError as error:
            # Pillow turns SyntaxError from a plugin into "cannot identify image file" with this reason.
            raise SyntaxError(f"not a valid .rcb file: {error}") from None
        self._data = data
        self._model_name = header.model_name
        self._size = (header.output_width, header.output_height)
        self._mode = "RGB"
        try:
            metadata = upright(Metadata(header.exif, header.xmp))
        except RcamError:  # damaged metadata does not make the pixels unreadable
            metadata = Metadata()
        if metadata.exif:
            self.info["exif"] = b"Exif\x00\x00" + metadata.exif
        if metadata.xmp:
            self.info["xmp"] = metadata.xmp
        self.info["icc_profile"] = srgb_icc_profile()
        self.tile = []

    def load(self):
        """Decode the pixels on first access (the model is loaded once per model name)."""
        if self._im is None and getattr(self, "_data", None) is not None:
            image = decode_bytes(_codec_for(self._model_name), self._data)
            self.im = Image.fromarray(quantize(image, 8), "RGB").im
            self._data = None
        return super().load()


Image.register_open(FORMAT, RcbImageFile, _accept)
Image.register_extension(FORMAT, ".rcb")
Image.register_mime(FORMAT, "image/x-rcam-rcb")
