"""common/data.py on real files written to tmp_path: every source, every refusal."""
import numpy as np
import pytest
from PIL import Image

from common.data import load_dataset, load_hospital_paths
from common.errors import UserError
from expect import user_error


# ----------------------------------------------------------------------------- helpers

def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def gray_images(n, h=12, w=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)


def write_image(path, size=(16, 16), mode="L", seed=0, fmt=None):
    """Write a random image of (w, h) `size`; the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).convert(mode).save(path, fmt)
    return path


def make_folder(root, classes=("benign", "malignant"), per_class=3, ext=".png", size=(16, 16), mode="L", seed=0):
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"img{i}{ext}", size=size, mode=mode, seed=seed + 10 * c + i)
    return root


def test_modules_do_not_import_tensorflow():
    # Other tests may have imported TF already, so read the sources instead of sys.modules.
    import common.data as d
    import common.image_folder as f
    import common.partition as p
    for mod in (d, f, p):
        src = open(mod.__file__).read()
        assert "import tensorflow" not in src and "tf_setup" not in src


# ----------------------------------------------------------------------------- digits

def test_digits_native_and_resized():
    ds = load_dataset("digits")
    assert ds.train_x.shape == (1797, 8, 8, 1) and ds.train_x.dtype == np.uint8  # held as uint8
    assert ds.train_y.dtype == np.int64 and ds.num_classes == 10 and ds.class_names[3] == "3"
    assert ds.train_x.min() == 0 and ds.train_x.max() == 255
    assert ds.test_x is None and ds.test_y is None and ds.input_shape == (8, 8, 1)
    # Pins the bundled file read without importing sklearn.datasets (same as load_digits()).
    assert np.bincount(ds.train_y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert ds.train_x[0, :, :, 0].tolist()[1] == np.rint(np.array([0, 0, 13, 15, 10, 15, 5, 0]) * 255 / 16).tolist()
    big = load_dataset("digits", image_size=20)
    assert big.input_shape == (20, 20, 1) and big.train_x.dtype == np.uint8
    assert any("resized 1797" in n for n in big.notes)
    # Bilinear upsampling keeps the mean brightness close.
    assert abs(big.train_x.mean() - ds.train_x.mean()) < 0.02 * 255


# ----------------------------------------------------------------------------- npz

def test_npz_grayscale_with_test_split(tmp_path):
    x = gray_images(20)
    y = np.arange(20) % 3
    path = write_npz(tmp_path / "g.npz", train_images=x, train_labels=y,
                     test_images=gray_images(6, seed=1), test_labels=np.array([0, 1, 2, 0, 1, 2]))
    ds = load_dataset("npz", path)
    assert ds.train_x.shape == (20, 12, 12, 1) and ds.test_x.shape == (6, 12, 12, 1)
    np.testing.assert_array_equal(ds.train_x[..., 0], x)  # uint8 kept exactly
    assert ds.num_classes == 3 and ds.class_names == ["0", "1", "2"]
    assert ds.train_y.dtype == np.int64 and list(ds.test_y) == [0, 1, 2, 0, 1, 2]


def test_npz_colour_column_labels_no_test_and_val_merged(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(10, 9, 7, 3), dtype=np.uint8)
    path = write_npz(tmp_path / "c.npz", train_images=x, train_labels=(np.arange(10) % 4)[:, None],
                     val_images=x[:3], val_labels=np.array([[0], [1], [2]]))
    ds = load_dataset("npz", path)
    assert ds.input_shape == (9, 7, 3) and len(ds.train_x) == 13 and ds.test_x is None
    assert ds.num_classes == 4 and ds.train_y.shape == (13,)
    assert any("merged 3" in n and "val_images" in n for n in ds.notes)


def test_npz_float_images_and_resize(tmp_path):
    x = np.random.default_rng(0).random((8, 10, 10)).astype(np.float32)
    path = write_npz(tmp_path / "f.npz", train_images=x, train_labels=np.array([0, 1] * 4, dtype=np.float64),
                     test_images=1 - x[:2], test_labels=np.array([1, 0]))  # not copies of train images
    ds = load_dataset("npz", path, image_size=16)
    assert ds.input_shape == (16, 16, 1) and ds.test_x.shape == (2, 16, 16, 1)
    np.testing.assert_allclose(ds.train_x.mean() / 255, x.mean(), atol=0.02)
    assert any("resized 8" in n and "16x16" in n for n in ds.notes)
    # A constant image stays constant through the resize (weights sum to one).
    const = write_npz(tmp_path / "k.npz", train_images=np.full((2, 5, 5), 0.25), train_labels=np.array([0, 1]))
    np.testing.assert_array_equal(load_dataset("npz", const, image_size=3).train_x, 64)  # rint(0.25 * 255)


def test_npz_float_0_255_is_rescaled_with_note(tmp_path):
    path = write_npz(tmp_path / "f.npz", train_images=np.full((4, 3, 3), 255.0), train_labels=np.array([0, 1, 0, 1]))
    ds = load_dataset("npz", path)
    assert ds.train_x.max() == 255 and any("255" in n for n in ds.notes)


BAD_NPZ = {
    "missing train_images": (dict(train_labels=np.array([0, 1])), "train_images"),
    "missing train_labels": (dict(train_images=gray_images(2)), "train_labels"),
    "2-D images": (dict(train_images=np.zeros((4, 144), np.uint8), train_labels=np.array([0, 1, 0, 1])), "(N, H, W)"),
    "4 channels": (dict(train_images=np.zeros((2, 4, 4, 4), np.uint8), train_labels=np.array([0, 1])), "channels"),
    "length mismatch": (dict(train_images=gray_images(3), train_labels=np.array([0, 1])), "train_labels has 2"),
    "non-integer labels": (dict(train_images=gray_images(2), train_labels=np.array([0.5, 1.0])), "non-integer"),
    "negative labels": (dict(train_images=gray_images(2), train_labels=np.array([-1, 1])), "negative"),
    "one-hot labels": (dict(train_images=gray_images(2), train_labels=np.eye(2)), "one-hot"),
    "NaN pixels": (dict(train_images=np.full((2, 3, 3), np.nan), train_labels=np.array([0, 1])), "NaN"),
    "inf pixels": (dict(train_images=np.full((2, 3, 3), np.inf), train_labels=np.array([0, 1])), "infinite"),
    "standardised pixels": (dict(train_images=np.full((2, 3, 3), -1.5), train_labels=np.array([0, 1])), "[0, 1]"),
    "empty train": (dict(train_images=np.zeros((0, 4, 4), np.uint8), train_labels=np.zeros(0, np.int64)), "empty"),
    "single class": (dict(train_images=gray_images(3), train_labels=np.zeros(3, np.int64)), "one class"),
    "test images without labels": (dict(train_images=gray_images(2), train_labels=np.array([0, 1]),
                                        test_images=gray_images(2)), "test_labels"),
    "test size differs": (dict(train_images=gray_images(2), train_labels=np.array([0, 1]),
                               test_images=gray_images(2, h=5, w=5), test_labels=np.array([0, 1])), "data.image_size"),
    "test channels differ": (dict(train_images=gray_images(2), train_labels=np.array([0, 1]),
                                  test_images=np.zeros((2, 12, 12, 3), np.uint8), test_labels=np.array([0, 1])), "channel"),
    "string labels": (dict(train_images=gray_images(2), train_labels=np.array(["a", "b"])), "dtype"),
}


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_npz_bad_data_names_the_file(tmp_path, case):
    arrays, expected = BAD_NPZ[case]
    path = write_npz(tmp_path / "bad.npz", **arrays)
    msg = user_error(load_dataset, "npz", path)
    assert "bad.npz" in msg and expected in msg, msg


def test_npz_unreadable_and_missing_paths(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_text("not an archive")
    assert "junk.npz" in user_error(load_dataset, "npz", str(junk))
    csv = tmp_path / "manifest.csv"  # NumPy would suggest unpickling it: never repeated to a user
    csv.write_text("file,label\na.png,0\n")
    said = user_error(load_dataset, "npz", str(csv))
    assert "manifest.csv" in said and "not an .npz archive" in said and "pickle" not in said
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    assert "single.npy" in user_error(load_dataset, "npz", str(single))
    assert "nowhere.npz" in user_error(load_dataset, "npz", str(tmp_path / "nowhere.npz"))
    assert "data.path" in user_error(load_dataset, "npz", "")
    assert "is a folder" in user_error(load_dataset, "npz", str(tmp_path))
    obj = tmp_path / "obj.npz"
    np.savez(obj, train_images=np.array([object(), object()], dtype=object), train_labels=np.array([0, 1]))
    assert "obj.npz" in user_error(load_dataset, "npz", str(obj))


# ----------------------------------------------------------------------------- folder

def test_folder_png_flat_layout(tmp_path):
    root = make_folder(tmp_path / "xray", classes=("pneumonia", "normal"), per_class=3)
    ds = load_dataset("folder", str(root))
    assert ds.class_names == ["normal", "pneumonia"] and ds.num_classes == 2
    assert ds.train_x.shape == (6, 16, 16, 1) and ds.test_x is None
    assert sorted(ds.train_y.tolist()) == [0, 0, 0, 1, 1, 1]
    # Pixel values survive exactly (no resize): compare one file.
    first = np.asarray(Image.open(root / "normal" / "img0.png"))
    assert any(np.array_equal(img[..., 0], first) for img in ds.train_x)


def test_folder_jpeg_train_test_layout_colour_to_gray(tmp_path):
    root = tmp_path / "derm"
    make_folder(root / "train", classes=("a", "b", "c"), per_class=2, ext=".JPG", mode="RGB")
    make_folder(root / "test", classes=("a", "c"), per_class=1, ext=".jpeg", mode="RGB", seed=100)  # other images
    (root / "train" / "a" / "notes.txt").write_text("ignored")
    ds = load_dataset("folder", str(root))
    assert ds.class_names == ["a", "b", "c"] and ds.input_shape == (16, 16, 1)
    assert len(ds.train_x) == 6 and len(ds.test_x) == 2 and sorted(ds.test_y.tolist()) == [0, 2]
    assert ds.train_x.dtype == np.uint8


def test_folder_val_split_merged(tmp_path):
    root = tmp_path / "d"
    make_folder(root / "train", per_class=2)
    make_folder(root / "val", per_class=1)
    ds = load_dataset("folder", str(root))
    assert len(ds.train_x) == 6 and ds.test_x is None and any("merged 2" in n for n in ds.notes)


def test_folder_mixed_sizes_resized_to_most_common_with_note(tmp_path):
    root = make_folder(tmp_path / "m", per_class=3, size=(20, 10))
    write_image(root / "benign" / "odd.png", size=(40, 30))
    write_image(root / "malignant" / "big.jpg", size=(200, 100))  # JPEG draft path
    ds = load_dataset("folder", str(root))
    assert ds.input_shape == (10, 20, 1) and len(ds.train_x) == 8
    assert any("resized 2 of 8" in n and "20x10" in n for n in ds.notes), ds.notes
    sq = load_dataset("folder", str(root), image_size=12)
    assert sq.input_shape == (12, 12, 1) and any("resized 8 of 8" in n for n in sq.notes)


def test_folder_16bit_png_keeps_full_range(tmp_path):
    root = make_folder(tmp_path / "r", per_class=2)
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(root / "benign" / "deep.png")
    ds = load_dataset("folder", str(root))
    assert (ds.train_x.reshape(len(ds.train_x), -1).max(axis=1) == 255).any()


def corrupt_folder(tmp_path):
    root = make_folder(tmp_path / "c", per_class=3)
    (root / "benign" / "garbage.png").write_bytes(b"this is not a png")
    whole = (root / "malignant" / "img0.png").read_bytes()
    (root / "malignant" / "truncated.png").write_bytes(whole[: len(whole) // 2])  # header ok, data cut
    return root


def test_folder_corrupt_image_refused_naming_file(tmp_path):
    root = corrupt_folder(tmp_path)
    msg = user_error(load_dataset, "folder", str(root))
    assert "garbage.png" in msg and "data.on_bad_image" in msg
    (root / "benign" / "garbage.png").unlink()
    msg = user_error(load_dataset, "folder", str(root))
    assert "truncated.png" in msg


def test_folder_corrupt_images_skipped_and_counted(tmp_path):
    root = corrupt_folder(tmp_path)
    ds = load_dataset("folder", str(root), on_bad_image="skip")
    assert len(ds.train_x) == 6 and len(ds.train_y) == 6
    note = next(n for n in ds.notes if n.startswith("skipped"))
    assert "skipped 2" in note and "garbage.png" in note and "truncated.png" in note


def test_folder_bad_layouts(tmp_path):
    root = make_folder(tmp_path / "a", per_class=1)
    (root / "empty_class").mkdir()
    assert "empty_class" in user_error(load_dataset, "folder", str(root))

    dicom = make_folder(tmp_path / "b", per_class=1)
    (dicom / "scans").mkdir()
    (dicom / "scans" / "x.dcm").write_bytes(b"DICM")
    msg = user_error(load_dataset, "folder", str(dicom))
    assert "scans" in msg and ".dcm" in msg

    flat = tmp_path / "flat"
    write_image(flat / "loose.png")
    assert "class folders" in user_error(load_dataset, "folder", str(flat))

    (tmp_path / "nothing").mkdir()
    assert "nothing" in user_error(load_dataset, "folder", str(tmp_path / "nothing"))

    one = make_folder(tmp_path / "one", classes=("only",), per_class=2)
    assert "one class folder" in user_error(load_dataset, "folder", str(one))

    split = tmp_path / "split"
    make_folder(split / "train", classes=("x", "y"), per_class=1)
    make_folder(split / "test", classes=("x", "z"), per_class=1)
    msg = user_error(load_dataset, "folder", str(split))
    assert "z" in msg and "not a train class" in msg

    only_test = tmp_path / "only_test"
    make_folder(only_test / "test", per_class=1)
    assert "no train/" in user_error(load_dataset, "folder", str(only_test))

    mixed = tmp_path / "mixed"
    make_folder(mixed / "train", per_class=1)
    make_folder(mixed, classes=("cats",), per_class=1)
    assert "cats" in user_error(load_dataset, "folder", str(mixed))

    afile = write_image(tmp_path / "f.png")
    assert "f.png" in user_error(load_dataset, "folder", str(afile))
    assert "missing" in user_error(load_dataset, "folder", str(tmp_path / "missing"))


def test_bad_options():
    assert "data.source" in user_error(load_dataset, "csv", "x")
    assert "data.image_size" in user_error(load_dataset, "digits", image_size=-1)
    assert "data.on_bad_image" in user_error(load_dataset, "digits", on_bad_image="ignore")


# ----------------------------------------------------------------------------- per hospital

def test_hospital_paths_agree_or_refuse(tmp_path):
    a = make_folder(tmp_path / "a", per_class=2, size=(16, 16))
    b = make_folder(tmp_path / "b", per_class=3, size=(16, 16))
    c = make_folder(tmp_path / "c", per_class=2, size=(24, 24))
    d = make_folder(tmp_path / "d", classes=("benign", "other"), per_class=2)
    both = load_hospital_paths("folder", [str(a), str(b)], image_size=0, on_bad_image="refuse")
    assert [len(ds.train_x) for ds in both] == [4, 6]
    msg = user_error(load_hospital_paths, "folder", [str(a), str(c)], image_size=0, on_bad_image="refuse")
    assert str(c) in msg and "data.image_size" in msg
    fixed = load_hospital_paths("folder", [str(a), str(c)], image_size=20, on_bad_image="refuse")
    assert {ds.input_shape for ds in fixed} == {(20, 20, 1)}
    msg = user_error(load_hospital_paths, "folder", [str(a), str(d)], image_size=0, on_bad_image="refuse")
    assert str(d) in msg and "classes" in msg
    assert "data.paths" in user_error(load_hospital_paths, "folder", [], image_size=0, on_bad_image="refuse")


def test_hospital_npz_label_ranges_must_match(tmp_path):
    p1 = write_npz(tmp_path / "h1.npz", train_images=gray_images(4), train_labels=np.array([0, 1, 2, 0]))
    p2 = write_npz(tmp_path / "h2.npz", train_images=gray_images(4), train_labels=np.array([0, 1, 0, 1]))
    msg = user_error(load_hospital_paths, "npz", [p1, p2], image_size=0, on_bad_image="refuse")
    assert "h2.npz" in msg


def test_folder_of_large_images_defaults_to_a_trainable_size_and_says_why(tmp_path):
    root = make_folder(tmp_path / "xl", per_class=2, size=(120, 100), mode="RGB")
    ds = load_dataset("folder", str(root))
    assert ds.input_shape == (32, 32, 1) and ds.train_x.dtype == np.uint8
    assert any("120x100" in n and "32x32" in n and "data.image_size" in n for n in ds.notes), ds.notes
    # data.image_size still chooses; data.color rgb keeps the three channels.
    big = load_dataset("folder", str(root), image_size=64, color="rgb")
    assert big.input_shape == (64, 64, 3) and not any("training at" in n for n in big.notes)
    assert not np.array_equal(big.train_x[..., 0], big.train_x[..., 1])  # colour kept, not gray copies


def test_an_image_size_above_the_images_says_it_only_enlarges_them(tmp_path):
    root = make_folder(tmp_path / "up", per_class=2, size=(20, 10))
    ds = load_dataset("folder", str(root), image_size=64)
    assert ds.input_shape == (64, 64, 1)
    assert any("data.image_size=64 enlarges every image" in n and "largest side is 20 px" in n for n in ds.notes)


def test_images_too_large_for_the_machine_are_refused_before_they_are_held(tmp_path, monkeypatch):
    import psutil

    root = make_folder(tmp_path / "mem", per_class=2, size=(20, 10))
    small = psutil.virtual_memory()._replace(total=64 * 2**20)  # a 64 MB machine: a quarter is 16 MB
    monkeypatch.setattr(psutil, "virtual_memory", lambda: small)
    with pytest.raises(UserError, match=r"4 images at 4096x4096x1 take 0.1 GB .* lower data.image_size"):
        load_dataset("folder", str(root), image_size=4096)
    assert load_dataset("folder", str(root), image_size=256).input_shape == (256, 256, 1)  # 0.25 MB fits
