"""common/dicom.py on real DICOM files (pydicom's test set) and DICOM class folders in common/image_folder.py.

Pixel values are checked against pydicom's own decoded array put through the DICOM grey-level
rules written out here independently (rescale, then the LINEAR window of PS3.3 C.11.2.1.2.1),
and lossless encodings of one image against each other.
"""
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_color_lut, pixel_array

from common.data import load_dataset
from common.dicom import decode_dicom, dicom_unit_pixels, is_dicom, read_header, read_patient_id
from common.errors import UserError
from dicom_files import blood_cell_images, pydicom_file, write_dicom
from expect import user_error


def native(path, color="gray"):
    """decode_dicom at the file's own size (no resizing), (H, W) for grey."""
    out = decode_dicom(path, read_header(path).size, color)
    return out[..., 0] if color == "gray" else out


def to_255(u):
    return np.rint(np.clip(u, 0, 1) * 255).astype(np.int64)


def reference_grey(path):
    """The first frame as 0..255 by the standard's formulas, from pydicom's raw decoded array."""
    ds = pydicom.dcmread(path)
    x = pixel_array(ds, index=0).astype(np.float64)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        x = x * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    if "WindowCenter" in ds:
        c, w = ds.WindowCenter, ds.WindowWidth
        c, w = float(c[0] if ds["WindowCenter"].VM > 1 else c), float(w[0] if ds["WindowWidth"].VM > 1 else w)
        u = (x - (c - 0.5)) / (w - 1) + 0.5  # LINEAR: the window maps onto the whole output range
    else:
        u = (x - x.min()) / (x.max() - x.min())
    u = to_255(u)
    return 255 - u if ds.PhotometricInterpretation == "MONOCHROME1" else u


def assert_close(ours, ref, atol=1):
    diff = np.abs(np.asarray(ours, dtype=np.int64) - np.asarray(ref, dtype=np.int64))
    assert diff.max() <= atol, f"max difference {diff.max()}"
    assert (diff == 0).mean() > 0.99  # float32 vs float64 rounding moves at most a few pixels by one level


# ----------------------------------------------------------------------------- grey levels

@pytest.mark.parametrize("name", [
    "MR_small.dcm",  # uncompressed, 16-bit signed, window 600/1600
    "MR_small_bigendian.dcm",  # big endian
    "examples_overlay.dcm",  # 12 bits stored, two windows: the first one counts
    "693_J2KI.dcm",  # JPEG 2000, CT: rescale -1024 then the brain window 40/100 in HU
    "CT_small.dcm",  # rescale and no window: 16-bit scaled across its own range
    "JPEG2000.dcm",  # JPEG 2000, no window
])
def test_grey_images_match_pydicoms_array_through_the_standard_luts(name):
    path = pydicom_file(name)
    ours = native(path)
    assert ours.dtype == np.uint8 and ours.shape == pixel_array(path, index=0).shape
    assert_close(ours, reference_grey(path))
    assert int(ours.max()) - int(ours.min()) > 150  # the window or range spreads over the 8 bits


def test_the_rescale_is_applied_before_the_window():
    path = pydicom_file("693_J2KI.dcm")  # RescaleIntercept -1024: window 40/100 is in HU, not stored values
    ds = pydicom.dcmread(path)
    assert float(ds.RescaleIntercept) == -1024
    stored = pixel_array(ds, index=0).astype(np.float64)
    without_rescale = to_255((stored - 39.5) / 99 + 0.5)
    assert np.abs(native(path).astype(int) - without_rescale).mean() > 20


def test_lossless_transfer_syntaxes_decode_to_the_same_pixels():
    # One MR image stored five ways: RLE, JPEG 2000 lossless and JPEG-LS lossless must equal uncompressed.
    base = native(pydicom_file("MR_small.dcm"))
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                 "MR_small_implicit.dcm"):
        path = pydicom_file(name)
        assert np.array_equal(native(path), base), name
    syntaxes = {pydicom.dcmread(pydicom_file(n)).file_meta.TransferSyntaxUID.name
                for n in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm")}
    assert syntaxes == {"RLE Lossless", "JPEG 2000 Image Compression (Lossless Only)"}


def test_jpeg_lossless_greyscale_when_cached():
    path = pydicom_file("JPGLosslessP14SV1_1s_1f_8b.dcm")  # download-only: skipped offline
    assert_close(native(path), reference_grey(path))


def test_monochrome1_is_inverted(tmp_path):
    src = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    src.PhotometricInterpretation = "MONOCHROME1"  # the same stored values, 0 = white
    inverted = tmp_path / "mono1.dcm"
    src.save_as(inverted)
    ours = native(inverted)
    assert_close(ours, reference_grey(inverted))
    assert_close(ours, 255 - native(pydicom_file("MR_small.dcm")).astype(int))


def test_monochrome1_cr_when_cached():
    path = pydicom_file("RG1_UNCR.dcm")  # a real MONOCHROME1 radiograph; download-only
    assert pydicom.dcmread(path, stop_before_pixels=True).PhotometricInterpretation == "MONOCHROME1"
    assert_close(native(path), reference_grey(path))


def test_eight_bit_grey_keeps_its_stored_values(tmp_path):
    cell = blood_cell_images(per_class=1)["basophil"][0]
    path = write_dicom(tmp_path / "cell.dcm", cell, "P1")
    assert np.array_equal(native(path), cell)  # no window: 0..255 stays 0..255, not stretched


def test_sixteen_bit_without_window_uses_the_images_range(tmp_path):
    cell = blood_cell_images(per_class=1)["basophil"][0].astype(np.uint16) * 4 + 1000  # values 1000..2020 of 65535
    ours = native(write_dicom(tmp_path / "deep.dcm", cell))
    expected = to_255((cell - cell.min()) / (cell.max() - cell.min()))
    assert_close(ours, expected)


# ----------------------------------------------------------------------------- colour

def test_rgb_lossless_encodings_agree_and_jpeg_baseline_is_close():
    rle = native(pydicom_file("SC_rgb_rle.dcm"), "rgb")
    assert rle.shape == (100, 100, 3) and np.array_equal(rle, pixel_array(pydicom_file("SC_rgb_rle.dcm")))
    assert np.array_equal(native(pydicom_file("SC_rgb_jpeg_gdcm.dcm"), "rgb"), rle)  # JPEG lossless (process 14)
    assert np.array_equal(native(pydicom_file("SC_rgb_rle_16bit.dcm"), "rgb"), rle)  # 16-bit RGB scaled to 8
    for name in ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_dcmtk_+eb+cr.dcm"):  # JPEG baseline (YBR and RGB)
        ours = native(pydicom_file(name), "rgb")
        assert np.array_equal(ours, pixel_array(pydicom_file(name), index=0))
        assert np.abs(ours.astype(int) - rle).max() <= 8  # lossy, but the same picture


def test_rgb_to_grey_weighs_channels_as_pillow(tmp_path):
    path = pydicom_file("SC_rgb_rle.dcm")
    rgb = pixel_array(path)
    assert_close(native(path, "gray"), np.asarray(Image.fromarray(rgb).convert("L")))


def test_grey_in_an_rgb_data_set_has_three_equal_channels():
    out = native(pydicom_file("MR_small.dcm"), "rgb")
    assert out.shape == (64, 64, 3) and (out == out[..., :1]).all()


def test_palette_colour_goes_through_its_lut():
    path = pydicom_file("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    rgb = apply_color_lut(pixel_array(ds), ds)
    assert_close(native(path, "rgb"), to_255(rgb / np.iinfo(rgb.dtype).max))


# ----------------------------------------------------------------------------- frames, sizes, refusals

def test_multi_frame_gives_its_first_frame():
    path = pydicom_file("examples_ybr_color.dcm")  # 30 frames, JPEG baseline
    assert read_header(path).frames == 30
    assert np.array_equal(native(path, "rgb"), pixel_array(path, index=0))
    assert not np.array_equal(native(path, "rgb"), pixel_array(path, index=1))


def test_resizing_keeps_the_picture():
    path = pydicom_file("MR_small.dcm")
    small = decode_dicom(path, (32, 16))
    assert small.shape == (16, 32, 1)
    big = native(path).astype(np.float64)
    assert abs(small.mean() - big.mean()) < 2
    halves = big.reshape(16, 4, 32, 2).mean(axis=(1, 3))
    assert np.abs(small[..., 0] - halves).mean() < 6


def test_header_and_patient_id_without_decoding():
    header = read_header(pydicom_file("JPEG2000.dcm"))
    assert header.size == (256, 1024) and header.frames == 1 and header.patient_id == "8NM1"
    assert read_patient_id(pydicom_file("MR_small.dcm")) == "4MR1"
    assert read_patient_id(pydicom_file("SC_jpeg_no_color_transform.dcm")) is None  # blank PatientID


@pytest.mark.parametrize("name, words", [
    ("rtplan.dcm", "no pixel data"),
    ("test-SR.dcm", "no pixel data"),
    ("JPGExtended.dcm", "JPEG Extended"),  # 12-bit: only GPL decoders read it
    ("MR_truncated.dcm", "pixel data"),
    ("no_meta.dcm", "not a DICOM file"),
])
def test_unreadable_files_raise_one_line(name, words):
    with pytest.raises(ValueError) as info:
        dicom_unit_pixels(pydicom_file(name))
    assert words in str(info.value) and "\n" not in " ".join(str(info.value).split())


def test_dicom_is_recognised_by_name_or_marker(tmp_path):
    cell = blood_cell_images(per_class=1)["basophil"][0]
    plain = write_dicom(tmp_path / "IM0001", cell)  # PACS exports often have no extension
    assert is_dicom(plain) and is_dicom(tmp_path / "x.DCM")
    Image.fromarray(cell).save(tmp_path / "cell.png")
    assert not is_dicom(tmp_path / "cell.png")


# ----------------------------------------------------------------------------- class folders of DICOMs

def dicom_folder(root, per_patient=3):
    """ROOT/<class>/*.dcm from real blood-cell crops, `per_patient` consecutive images per patient."""
    raw = {}
    for name, crops in blood_cell_images().items():
        for i, crop in enumerate(crops):
            pid = f"{name[:3].upper()}-{i // per_patient}"
            path = write_dicom(root / name / f"img{i}.dcm", crop, pid)
            raw[str(path)] = pid
    return raw


def test_a_folder_of_dicoms_loads_like_pngs_with_pseudonymised_patients(tmp_path):
    raw = dicom_folder(tmp_path / "cells")
    ds = load_dataset("folder", str(tmp_path / "cells"))
    assert ds.class_names == ["basophil", "eosinophil", "lymphocyte"] and ds.input_shape == (32, 32, 1)
    assert len(ds.train_x) == 18 and ds.train_patients is not None and len(ds.train_patients) == 18
    ids = sorted(raw.values())
    assert not set(ds.train_patients) & set(ids)  # only pseudonyms are kept
    assert len(set(ds.train_patients)) == len(set(ids)) == 6
    # One patient's images share a pseudonym and so a group (common/duplicates.py keeps groups whole).
    for p in set(ds.train_patients):
        assert len(set(ds.train_groups[ds.train_patients == p])) == 1
    assert (tmp_path / "cells" / ".patients.salt").is_file()
    again = load_dataset("folder", str(tmp_path / "cells"))
    assert np.array_equal(again.train_patients, ds.train_patients)  # stable across loads


def test_bad_dicoms_in_a_folder_follow_the_bad_image_policy(tmp_path):
    root = tmp_path / "cells"
    dicom_folder(root)
    plan = root / "basophil" / "plan.dcm"
    plan.write_bytes(open(pydicom_file("rtplan.dcm"), "rb").read())
    msg = user_error(load_dataset, "folder", str(root))
    assert "plan.dcm" in msg and "no pixel data" in msg and "on_bad_image: skip" in msg
    ds = load_dataset("folder", str(root), on_bad_image="skip")
    assert len(ds.train_x) == 18 and any("skipped 1" in n and "plan.dcm" in n for n in ds.notes)


def test_a_multi_frame_file_in_a_folder_is_noted(tmp_path):
    root = tmp_path / "cells"
    dicom_folder(root)
    cine = root / "eosinophil" / "cine.dcm"
    cine.write_bytes(open(pydicom_file("SC_rgb_rle_2frame.dcm"), "rb").read())
    ds = load_dataset("folder", str(root), image_size=32)
    assert len(ds.train_x) == 19
    assert any("1 multi-frame DICOM file(s)" in n and "first frame only" in n and "cine.dcm" in n for n in ds.notes)
