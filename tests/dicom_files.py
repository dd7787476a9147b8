"""Writing real DICOM files for the tests: pixels from real images, the pixel module set by pydicom itself."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BLOOD_CELLS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "blood_cells"


def pydicom_file(name):
    """A file of pydicom's test set; skipped when pydicom ships it only as a download (never fetched here)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is download-only and not cached; the tests never download")
    return path


def blood_cell_images(classes=("basophil", "eosinophil", "lymphocyte"), per_class=6, size=32, mode="L"):
    """{class: [(h, w) or (h, w, 3) uint8 centre crops]} of real blood-cell JPEGs; skipped when the data is absent."""
    if not BLOOD_CELLS.is_dir():
        pytest.skip(f"{BLOOD_CELLS} is absent (shared data); the DICOM table tests write DICOMs from its images")
    out = {}
    for name in classes:
        files = sorted((BLOOD_CELLS / name).glob("*.jpg"))[:per_class]
        if len(files) < per_class:
            pytest.skip(f"{BLOOD_CELLS / name} has fewer than {per_class} images")
        crops = []
        for f in files:
            with Image.open(f) as im:
                w, h = im.size
                box = ((w - size) // 2, (h - size) // 2, (w + size) // 2, (h + size) // 2)
                crops.append(np.asarray(im.convert(mode).crop(box), dtype=np.uint8))
        out[name] = crops
    return out


def write_dicom(path, pixels, patient_id=None, syntax=None, **elements):
    """Write `pixels` ((h, w) grey or (h, w, 3) RGB, uint8 or uint16) as a DICOM file at `path`."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    if patient_id is not None:
        ds.PatientID = patient_id
    pixels = np.ascontiguousarray(pixels)
    photometric = "RGB" if pixels.ndim == 3 else "MONOCHROME2"
    ds.set_pixel_data(pixels, photometric, 8 * pixels.dtype.itemsize)
    for key, value in elements.items():
        setattr(ds, key, value)
    if syntax is not None:
        ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)
    return path
