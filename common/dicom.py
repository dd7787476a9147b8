"""Reading one DICOM file: its header (size, frames, PatientID) and its first frame as uint8 pixels.

Pixel data is decoded by pydicom with the permissively licensed handlers this project installs:
python-gdcm (GDCM, BSD; the python-gdcm wheel is Apache-2.0), pylibjpeg (MIT) with
pylibjpeg-openjpeg (MIT) and pylibjpeg-rle (MIT), and Pillow (MIT-CMU). Measured with pydicom
3.0.2's test files: uncompressed (little/big endian, implicit/explicit VR, deflated), JPEG
baseline (gdcm, Pillow), JPEG lossless (gdcm), JPEG 2000 (gdcm, openjpeg, Pillow), JPEG-LS
(gdcm) and RLE (pydicom's own decoder, pylibjpeg-rle) all decode. 12-bit JPEG extended does
not: only GPL decoders (pylibjpeg-libjpeg) read it, and the project is Apache-2.0, so such a
file is refused with a line saying to re-export it.

Grey levels, in the order DICOM defines them (PS3.3 C.11): the modality rescale
(RescaleSlope/RescaleIntercept, or a modality LUT), then the VOI window (WindowCenter/
WindowWidth, the first when several are given; a VOI LUT when there is no window), scaled to
0..255 across the window's output range. Without a window, images of at most 8 stored bits
are scaled across their stored range; deeper ones across their own min..max, because a fixed
12- or 16-bit range would leave a typical MR image (values 0..2000 of 65535) a few grey levels.
MONOCHROME1 (0 = white) is inverted so that bright means dense everywhere. Colour (RGB, YBR,
which pydicom converts to RGB, and palette colour) keeps 3 channels or is converted to grey per
`color`, with the same weights as Pillow's convert("L").

A multi-frame file (a cine loop, a tomosynthesis stack) contributes its first frame only; the
loaders say how many files that was. A file with no pixel data (a report, a structured report,
an RT plan) cannot be an image and is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as Pillow's convert("L")


@dataclass(frozen=True)
class DicomHeader:
    size: tuple[int, int]  # (width, height) of one frame, as Pillow's Image.size
    frames: int  # NumberOfFrames (1 for a single image)
    patient_id: str | None  # the raw PatientID: pseudonymise before it is kept (common/pseudonym.py)


def read_header(path) -> DicomHeader:
    """The header of the DICOM file at `path`, without decoding pixels; ValueError if it holds no image."""
    # defer_size keeps large values (the pixel data) on disk: the header pass stays cheap.
    ds = _read(path, defer_size="64 KB")
    _check_image(ds)
    return DicomHeader((int(ds.Columns), int(ds.Rows)), int(ds.get("NumberOfFrames") or 1), _patient(ds))


def _read(path, **kwargs):
    # Imported on first use: the coordinator and non-DICOM loads never pay for pydicom's import.
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, **kwargs)
    except InvalidDicomError:
        # pydicom's own text suggests force=True, which is for programmers, not for a hospital's data.
        raise ValueError("not a DICOM file (no 'DICM' file header); export it as a DICOM file (Part 10)") from None


def _check_image(ds):
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise ValueError("the DICOM file has no pixel data (a report, structured report or plan, not an image)")
    if not ds.get("Rows") or not ds.get("Columns"):
        raise ValueError("the DICOM file has pixel data but no Rows/Columns, so its image size is unknown")


def read_patient_id(path) -> str | None:
    """The PatientID of the DICOM file at `path` (None when absent or blank); pixels are not read."""
    return _patient(_read(path, stop_before_pixels=True))


def _patient(ds) -> str | None:
    value = str(ds.get("PatientID") or "").strip()
    return value or None


def decode_dicom(path, target, color="gray") -> np.ndarray:
    """The first frame of the DICOM file at `path` as (h, w, 1) or, for color "rgb", (h, w, 3) uint8 at `target` (w, h)."""
    x = dicom_unit_pixels(path)  # (H, W) or (H, W, 3) float32 in [0, 1]
    if x.ndim == 3 and color != "rgb":
        x = x @ _LUMA
    channels = [x] if x.ndim == 2 else [x[..., i] for i in range(3)]
    if x.shape[1::-1] != tuple(target):
        # Mode "F" keeps the full precision through Pillow's antialiased bilinear resize.
        channels = [np.asarray(Image.fromarray(c).resize(tuple(target), Image.Resampling.BILINEAR)) for c in channels]
    out = np.clip(np.rint(np.stack(channels, axis=-1) * 255.0), 0, 255).astype(np.uint8)
    if color == "rgb" and out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)  # a grey image in a colour data set: every hospital sees 3 channels
    return out


def dicom_unit_pixels(path) -> np.ndarray:
    """The first frame of the DICOM file at `path` after the modality and VOI LUTs, in [0, 1], float32."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

    ds = _read(path)
    _check_image(ds)
    try:
        raw = pixel_array(ds, index=0)  # the first frame only; YBR converted to RGB
    except (RuntimeError, NotImplementedError) as err:
        raise ValueError(_undecodable(ds, err)) from None
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(raw, ds)
        return (rgb / np.float32(np.iinfo(rgb.dtype).max)).astype(np.float32)
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        top = 2 ** int(ds.get("BitsStored", 8)) - 1
        return (raw.astype(np.float32) / np.float32(top)).clip(0, 1)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric interpretation {photometric or 'missing'} is not supported; "
                         "export MONOCHROME2, RGB or YBR")
    x, (lo, hi) = _grey_levels(raw, ds, apply_modality_lut, apply_voi_lut)
    x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    x = np.clip(x, 0, 1).astype(np.float32)
    return 1 - x if photometric == "MONOCHROME1" else x


def _grey_levels(raw, ds, apply_modality_lut, apply_voi_lut):
    """(values after the modality and VOI LUTs, (low, high) of the range they are scaled across)."""
    x = apply_modality_lut(raw, ds)  # integers stay integers: a VOI LUT indexes by them
    windowed = "WindowCenter" in ds and "WindowWidth" in ds
    if windowed or ds.get("VOILUTSequence"):
        # prefer_lut=False: a window, when given, wins over a VOI LUT (the rule).
        x = apply_voi_lut(x, ds, index=0, prefer_lut=False)
        # The window's output range depends on the rescale, the LUT descriptors and the sign of the
        # stored values; asking pydicom where it sends the extremes keeps our scale in step with its rules.
        with np.errstate(over="ignore"):
            ends = apply_voi_lut(np.array([-2**31, 2**31 - 1], dtype=np.int64), ds, index=0, prefer_lut=False)
        return np.asarray(x, dtype=np.float64), (float(np.min(ends)), float(np.max(ends)))
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if bits <= 8 and not ds.get("ModalityLUTSequence"):
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        stored = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2 ** bits - 1])
        ends = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
        return np.asarray(x, dtype=np.float64), (float(ends.min()), float(ends.max()))
    x = np.asarray(x, dtype=np.float64)
    return x, (float(x.min()), float(x.max()))


def _undecodable(ds, err) -> str:
    """One line for pixel data no installed handler decodes, with the handler's own reason."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    name = getattr(syntax, "name", None) or "its"
    # pydicom lists one 'plugin: reason' line per handler it tried; the first says enough.
    reasons = [line.strip() for line in str(err).splitlines()[1:] if ":" in line]
    why = reasons[0] if reasons else " ".join(str(err).split())
    return (f"{name} pixel data cannot be decoded with this project's handlers ({why[:120]}); "
            "re-export it uncompressed, JPEG lossless, JPEG 2000 or RLE")


DICOM_EXTENSIONS = (".dcm", ".dicom")


def is_dicom(path) -> bool:
    """A .dcm/.dicom name, or a file whose 'DICM' marker sits at byte 128 (PACS exports often have no extension)."""
    suffix = Path(path).suffix.lower()
    if suffix in DICOM_EXTENSIONS:
        return True
    if suffix in (".png", ".jpg", ".jpeg"):
        return False
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False
