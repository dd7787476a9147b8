"""A hostile coordinator: weights crafted so that one example's loss overflows.

Without protection the clipped sum becomes NaN exactly when the target example is in the
batch, which reveals its presence. With it, a non-finite example counts as zero, so it moves
the sum by at most C (here: not at all) whatever the weights.
"""
import numpy as np
import pytest

from common.dp_sgd import DPSGDEngine
from common.tf_setup import keras

CLIP = 1.0
TARGET = 3


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 8, 8, 1)).astype(np.float32)
    x[TARGET] += 10.0  # the image the coordinator wants to detect
    return x, rng.integers(0, 3, 10)


def _layers():
    return [keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax")]


def _hostile(model):
    """Weights under which only the target's 3x3 patches pass the ReLU, at ~1e36, then logits overflow."""
    conv, dense = [layer for layer in model.layers if layer.weights]
    conv.set_weights([np.full((3, 3, 1, 4), 1e35, np.float32), np.full(4, -1e35 * 54, np.float32)])
    dense.set_weights([np.full(dense.kernel.shape, 1e10, np.float32), np.zeros(3, np.float32)])
    return model


def _sequential():
    return _hostile(keras.Sequential([keras.layers.InputLayer(input_shape=(8, 8, 1)), *_layers()]))


def _functional():  # not a Sequential: the engine takes its per-example-gradient (slow) path
    inputs = keras.Input((8, 8, 1))
    h = inputs
    for layer in _layers():
        h = layer(h)
    return _hostile(keras.Model(inputs, h))


@pytest.mark.parametrize("build, jit", [(_sequential, False), (_sequential, True), (_functional, False)])
def test_an_overflowing_example_moves_the_clipped_sum_by_at_most_c(build, jit):
    x, y = _data()
    model = build()
    engine = DPSGDEngine(model, l2_norm_clip=CLIP, noise_multiplier=1.0, learning_rate=0.1, seed=0,
                         jit_compile=jit)
    assert engine.fast_path == (build is _sequential)
    # The crafted weights do overflow the target (and only the target) in the forward pass.
    outputs = model(x, training=False).numpy()
    assert not np.all(np.isfinite(outputs[TARGET]))
    assert np.all(np.isfinite(np.delete(outputs, TARGET, axis=0)))

    others = [i for i in range(len(x)) if i != TARGET]
    with_target = engine.clipped_gradient_sum(x, y)
    without = engine.clipped_gradient_sum(x[others], y[others])
    assert all(np.all(np.isfinite(g)) for g in with_target)
    difference = np.sqrt(sum(np.sum((a.astype(np.float64) - b) ** 2) for a, b in zip(with_target, without)))
    assert difference <= CLIP * (1 + 1e-5)

    # A whole noisy training run on data holding the target returns finite weights.
    stats = engine.train(x, y, sampling_rate=1.0, steps=2)
    assert np.isfinite(stats.mean_loss)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


# ------------------------------------------------------------------ what a hospital sends on failure

@pytest.fixture(autouse=True)
def _restore_task_identity():
    """_message sets Flower's task identity as the coordinator's process would: put it back, so
    no later test inherits this file's run id."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _message(message_type, content):
    from flwr.app import Message
    from flwr.supercore.task_identity import TaskIdentity

    # What Flower's runtime sets in the coordinator's process before it builds a message.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 77, 0
    return Message(content=content, dst_node_id=1, message_type=message_type)


def _context(node_config, tmp_path):
    from flwr.app import Context, RecordDict

    config = {"hospital-id": "hospital-x", "max-epsilon": 8.0, "delta": 1e-5,
              "odometer-path": str(tmp_path / "odometer.jsonl"), **node_config}
    return Context(run_id=77, node_id=1, node_config=config, state=RecordDict(), run_config={})


def _train_content(learning_rate=0.5):
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from common.model import build_model

    model = build_model((16, 16, 1), 2, (4,), 8)
    return RecordDict({"arrays": ArrayRecord(model.get_weights()), "config": ConfigRecord({
        "server-round": 1, "batch_size": 4, "local_epochs": 1.0, "learning_rate": learning_rate,
        "momentum": 0.0, "lr_schedule": "constant", "l2_norm_clip": 1.0, "noise_multiplier": 1.0,
        "planned_rounds": 3})})


def _sent_bytes(reply) -> bytes:
    from flwr.common.serde import message_to_proto

    return message_to_proto(reply).SerializeToString()


def _image_folder(root, per_class=20):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("normal", "pneumonia"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / label / f"img{i}.png")
    return root


def test_a_bad_images_path_never_reaches_the_coordinator(tmp_path, caplog):
    from client.client_app import app

    folder = _image_folder(tmp_path / "ward-7")
    secret = "patient-4711-MRN-0042"
    (folder / "pneumonia" / f"{secret}.png").write_bytes(b"not an image")
    context = _context({"data-source": "folder", "data-path": str(folder)}, tmp_path)
    with caplog.at_level("ERROR", logger="hospital"):
        reply = app(_message("train", _train_content()), context)
    assert reply.has_error() and reply.error.reason == "data: hospital-x"
    sent = _sent_bytes(reply)
    for text in (secret, "ward-7", str(tmp_path)):
        assert text.encode() not in sent
    # The details stay with the hospital: its log and its error file.
    assert secret in caplog.text
    assert secret in (tmp_path / "odometer.errors.log").read_text()


def test_only_the_hospital_decides_whether_unreadable_images_are_skipped(tmp_path):
    """A coordinator that could switch data.on_bad_image would learn from which setting fails
    whether the hospital holds unreadable files."""
    from client.task import deployment_site
    from common.config import load_config
    from common.errors import UserError

    node = _node(tmp_path, "folder")
    (tmp_path / "data" / "pneumonia" / "broken.png").write_bytes(b"not an image")
    skip = load_config(None, ["data.on_bad_image=skip"])
    with pytest.raises(UserError, match="broken.png"):  # the node's default, refuse, stands
        deployment_site(node, skip)
    refuse = load_config(None, ["data.on_bad_image=refuse"])
    site = deployment_site({**node, "on-bad-image": "skip"}, refuse)  # the hospital's own choice
    assert len(site.train_y) + len(site.eval_y) == 40
    with pytest.raises(UserError, match="on-bad-image must be"):
        deployment_site({**node, "on-bad-image": "ignore"}, refuse)


def test_coordinator_settings_the_engine_would_refuse_are_refused_before_any_charge(tmp_path):
    from client.client_app import app

    folder = _image_folder(tmp_path / "data")
    context = _context({"data-source": "folder", "data-path": str(folder)}, tmp_path)
    reply = app(_message("train", _train_content(learning_rate=float("nan"))), context)
    assert reply.has_error() and reply.error.reason == "settings: hospital-x"
    assert not (tmp_path / "odometer.jsonl").exists()


@pytest.mark.parametrize("budget, category", [
    ({"delta": 1.0}, "budget"), ({"delta": 5}, "budget"), ({"max-epsilon": "nan"}, "budget"),
    ({"max-epsilon": float("inf")}, "budget"), ({"delta": 0.05}, "budget"),  # 0.05 >= 1/n for n = 36
])
def test_budgets_that_are_not_numbers_or_too_loose_are_refused(tmp_path, budget, category):
    from client.client_app import app

    folder = _image_folder(tmp_path / "data")
    context = _context({"data-source": "folder", "data-path": str(folder), **budget}, tmp_path)
    reply = app(_message("train", _train_content()), context)
    assert reply.has_error() and reply.error.reason == f"{category}: hospital-x"
    assert not (tmp_path / "odometer.jsonl").exists()


# ------------------------------------------------------------------ the hospital owns its split

def _node(tmp_path, source="npz", **extra):
    """A deployed hospital's node config over 200 random 8x8 images (npz) or a small folder."""
    if source == "npz":
        rng = np.random.default_rng(1)
        data = tmp_path / "h.npz"
        np.savez(data, train_images=rng.integers(0, 256, (200, 8, 8), dtype=np.uint8),
                 train_labels=rng.integers(0, 2, 200))
    else:
        data = _image_folder(tmp_path / "data")
    return {"hospital-id": "h", "data-source": source, "data-path": str(data), "max-epsilon": 8.0,
            "delta": 1e-5, "odometer-path": str(tmp_path / "odo.jsonl"), "eval-fraction": 0.2, **extra}


def test_the_deployed_split_is_the_hospitals_and_survives_other_run_configs(tmp_path):
    from client.task import deployment_site
    from common.config import load_config

    node = _node(tmp_path)

    def eval_rows(site):
        return {row.tobytes() for row in site.eval_x}

    first = deployment_site(node, load_config(None, []))
    assert (tmp_path / "odo.jsonl.split.json").is_file()
    assert 15 <= len(first.eval_y) <= 65 and len(first.eval_y) + len(first.train_y) == 200
    # The coordinator's run config changes seed and fraction: not one image moves.
    other = deployment_site(node, load_config(None, ["seed=99", "data.local_eval_fraction=0.5"]))
    assert eval_rows(other) == eval_rows(first)
    # Even the hospital's own later settings keep the stored split.
    changed = deployment_site({**node, "eval-fraction": 0.5, "split-seed": "x"}, load_config(None, []))
    assert eval_rows(changed) == eval_rows(first)
    assert first.odometer.data_fingerprint == changed.odometer.data_fingerprint != ""


def test_a_coordinator_that_changes_how_images_are_prepared_cannot_move_or_pin_an_example(tmp_path):
    """The split is decided on the hospital's own preparation (issue 25 item 4): any run's
    data.image_size trains on the same examples, and the first query pins nothing."""
    import json

    from client.split import PreparationChanged
    from client.task import SPLIT_PREPARATION, deployment_site
    from common.config import load_config

    # Image i is flat at grey level i: it stays recognisable at every size.
    levels = np.arange(200, dtype=np.uint8)
    data = tmp_path / "flat.npz"
    np.savez(data, train_images=np.repeat(levels, 64).reshape(200, 8, 8), train_labels=levels % 2)
    node = {**_node(tmp_path), "data-path": str(data)}

    def eval_levels(site):
        return sorted(int(image[0, 0, 0]) for image in site.eval_x)

    resized = deployment_site(node, load_config(None, ["data.image_size=10"]))  # a hostile first query
    assert resized.eval_x.shape[1:3] == (10, 10)
    split_file = tmp_path / "odo.jsonl.split.json"
    assert json.loads(split_file.read_text())["prepared"] == {"image_size": SPLIT_PREPARATION["image_size"]}
    native = deployment_site(node, load_config(None, []))  # an honest run later is not locked out
    assert native.eval_x.shape[1:3] == (8, 8)
    assert eval_levels(native) == eval_levels(resized) and 15 <= len(native.eval_y) <= 65
    assert sorted(int(i[0, 0, 0]) for i in native.train_x) == sorted(set(range(200)) - set(eval_levels(native)))
    # The hospital may choose the preparation itself, in its node config.
    other = tmp_path / "other"
    other.mkdir()
    own = deployment_site({**node, "odometer-path": str(other / "odo.jsonl"), "split-image-size": 0},
                          load_config(None, ["data.image_size=10"]))
    assert json.loads((other / "odo.jsonl.split.json").read_text())["prepared"] == {"image_size": 0}
    assert len(own.eval_y) + len(own.train_y) == 200

    # A split file written before the preparation was recorded was decided on the run's images:
    # the same preparation is adopted, another refused.
    stored = json.loads(split_file.read_text())
    stored["eval"] = sorted(json.loads(split_file.read_text())["eval"])
    del stored["prepared"]
    split_file.write_text(json.dumps(stored))
    with pytest.raises(PreparationChanged) as refused:
        deployment_site(node, load_config(None, ["data.image_size=10"]))
    assert refused.value.category == "settings"
    again = deployment_site(node, load_config(None, [f"data.image_size={SPLIT_PREPARATION['image_size']}"]))
    assert eval_levels(again) == eval_levels(native)


@pytest.mark.parametrize("value, message", [("1", "whole number >= 2"), ("x", "whole number >= 2"),
                                            ("1.5", "whole number >= 2")])
def test_num_classes_in_the_node_config_is_checked(tmp_path, value, message):
    from client.task import deployment_site
    from common.config import load_config
    from common.errors import UserError

    with pytest.raises(UserError, match=message):
        deployment_site(_node(tmp_path, **{"num-classes": value}), load_config(None, []))


def test_the_class_count_comes_from_the_node_config_not_the_labels_held(tmp_path):
    """Without the top class's one patient, an .npz hospital still builds the study's model (issue 25 item 4)."""
    from client.task import deployment_site
    from common.config import load_config
    from common.errors import UserError

    node = _node(tmp_path, **{"num-classes": 5})  # labels 0..1 held; the study has 5 classes
    site = deployment_site(node, load_config(None, []))
    assert site.num_classes == 5
    assert deployment_site({k: v for k, v in node.items() if k != "num-classes"}, load_config(None, [])).num_classes == 2
    rng = np.random.default_rng(2)
    four = tmp_path / "four.npz"
    np.savez(four, train_images=rng.integers(0, 256, (200, 8, 8), dtype=np.uint8), train_labels=np.arange(200) % 4)
    with pytest.raises(UserError, match=r"holds label 3: labels must be 0\.\.2"):
        deployment_site({**node, "data-path": str(four), "num-classes": 3}, load_config(None, []))


def test_a_model_builder_runs_only_if_the_hospital_allows_it(tmp_path):
    from client.task import SettingsError, deployment_site
    from common.config import load_config

    node = _node(tmp_path, "folder")
    config = load_config(None, ["model.builder=tests.apps.builders:tiny"])
    with pytest.raises(SettingsError, match="does not allow"):
        deployment_site(node, config)
    site = deployment_site({**node, "model-builders": "other:thing, tests.apps.builders:tiny"}, config)
    assert len(site.train_y) > 0


@pytest.mark.parametrize("value, expected", [("false", False), ("off", False), ("No", False), ("true", True),
                                             ("disabled", None), ("", None)])
def test_the_evaluation_switch_refuses_what_it_cannot_read(tmp_path, value, expected):
    from client.task import deployment_site
    from common.config import load_config
    from common.errors import UserError

    node = _node(tmp_path, "folder", evaluate=value)
    if expected is None:
        with pytest.raises(UserError, match="evaluate"):
            deployment_site(node, load_config(None, []))
    else:
        assert deployment_site(node, load_config(None, [])).evaluate is expected


def test_a_misspelt_node_config_key_is_refused_not_read_as_its_default(tmp_path):
    from client.task import deployment_site
    from common.config import load_config
    from common.errors import UserError

    # "evalute=false" silently left evaluation on: the hospital's scores went to the coordinator.
    node = _node(tmp_path, "folder", evalute="false")
    with pytest.raises(UserError, match="unknown key 'evalute': did you mean 'evaluate'"):
        deployment_site(node, load_config(None, []))
    assert deployment_site(_node(tmp_path, "folder", evaluate="false"), load_config(None, [])).evaluate is False
    # A data mistake names the node config's key, not the run config's.
    with pytest.raises(UserError, match="check the node config's data-path") as error:
        deployment_site(_node(tmp_path, "npz", **{"data-path": str(tmp_path / "nope.npz")}), load_config(None, []))
    assert "data.path" not in str(error.value)


@pytest.mark.parametrize("clip", [2.3e-38, 1e-5, 2e38])
def test_a_clip_bound_outside_the_range_is_refused_by_config_and_hospital(clip):
    from client.task import SettingsError, TrainSettings
    from common.config import load_config
    from common.errors import UserError

    # sigma * C below float32's smallest normal number is flushed to 0 on CPUs: noise gone.
    with pytest.raises(SettingsError, match="l2_norm_clip"):
        TrainSettings(4, 1.0, 0.1, 0.0, "constant", clip, 0.5, 3)
    with pytest.raises(UserError, match="l2_norm_clip"):
        load_config(None, [f"dp.l2_norm_clip={clip}"])


@pytest.mark.parametrize("change", ["past_the_plan", "wrong_weights"])
def test_settings_that_break_the_step_are_refused_before_any_charge(tmp_path, change):
    from flwr.app import ArrayRecord

    from client.client_app import app

    folder = _image_folder(tmp_path / "data")
    context = _context({"data-source": "folder", "data-path": str(folder)}, tmp_path)
    content = _train_content()
    if change == "past_the_plan":  # cosine at a round beyond the plan: a learning rate of 0
        content["config"]["lr_schedule"], content["config"]["server-round"] = "cosine", 4
        content["arrays"] = ArrayRecord(_default_model_weights((16, 16, 1)))
    reply = app(_message("train", content), context)
    assert reply.has_error() and reply.error.reason == "settings: hospital-x"
    assert not (tmp_path / "odometer.jsonl").exists()
    why = {"past_the_plan": "past the 3 rounds planned",
           # which shapes, and what the operator can change
           "wrong_weights": "do not fit this hospital's model: it sent an array of shape"}
    log = (tmp_path / "odometer.errors.log").read_text()
    assert why[change] in log  # the details stay local
    if change == "wrong_weights":
        assert "images are 16x16x1 in" in log and "data.image_size" in log, log


@pytest.mark.parametrize("settings, why", [
    ({"noise_multiplier": 0.07}, "noise_multiplier=0.07"),  # its PLD alone would take ~13 GB
    ({"noise_multiplier": 0.0}, "noise_multiplier=0.0"),
    ({"planned_rounds": 10**6}, "10000 passes"),  # accounting 10^6 rounds would take minutes and gigabytes
    ({"local_epochs": 10_001.0, "planned_rounds": 1}, "10000 passes"),
])
def test_settings_whose_accounting_would_exhaust_the_hospital_are_refused_before_it(tmp_path, settings, why):
    from client.client_app import app

    folder = _image_folder(tmp_path / "data")
    context = _context({"data-source": "folder", "data-path": str(folder)}, tmp_path)
    content = _train_content()
    for key, value in settings.items():
        content["config"][key] = value
    reply = app(_message("train", content), context)
    assert reply.has_error() and reply.error.reason == "settings: hospital-x"
    assert not (tmp_path / "odometer.jsonl").exists()
    assert why in (tmp_path / "odometer.errors.log").read_text()


def test_the_config_refuses_the_same_noise_and_work_a_hospital_would():
    from common.config import load_config
    from common.errors import UserError

    with pytest.raises(UserError, match="dp.noise_multiplier' must be >= 0.5"):
        load_config(None, ["dp.noise_multiplier=0.3"])
    with pytest.raises(UserError, match="rounds x train.local_epochs"):
        load_config(None, ["rounds=5001", "train.local_epochs=2"])
    assert load_config(None, ["dp.noise_multiplier=0.5", "rounds=10000"]).rounds == 10000


def _default_model_weights(input_shape):
    from common.config import ModelConfig
    from common.model import make_model

    return make_model(ModelConfig(), input_shape, 2).get_weights()


# ------------------------------------------------------------------ config refuses non-numbers

@pytest.mark.parametrize("override", ["train.learning_rate=nan", "privacy.max_epsilon=nan",
                                      "privacy.delta=inf", "dp.l2_norm_clip=inf", "train.local_epochs=nan"])
def test_config_refuses_nan_and_infinity(override):
    from common.config import load_config
    from common.errors import UserError

    with pytest.raises(UserError, match="finite"):
        load_config(None, [override])


def test_default_odometer_dir_is_the_users_data_dir_whatever_the_working_directory(tmp_path, monkeypatch):
    from common.config import PROJECT_ROOT, load_config

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    resolved = load_config(None, []).privacy.odometer_dir
    assert resolved == str(tmp_path / "data" / "hospital-fl" / "odometer")
    assert not resolved.startswith(str(PROJECT_ROOT))  # never inside the installation or its venv


@pytest.mark.parametrize("name", ["", " ", "h\x1b[2J", "x" * 65, "-lead"])
def test_an_unusable_hospital_id_is_refused_before_any_charge(tmp_path, name):
    """The coordinator would reject every reply of such a name, after each charge: refuse it first."""
    from client.client_app import app

    folder = _image_folder(tmp_path / "data")
    context = _context({"hospital-id": name, "data-source": "folder", "data-path": str(folder)}, tmp_path)
    reply = app(_message("train", _train_content()), context)
    assert reply.has_error() and reply.error.reason == "data"  # no usable name to add
    assert not (tmp_path / "odometer.jsonl").exists()
    assert "hospital-id" in (tmp_path / "odometer.errors.log").read_text()


def test_an_odometer_that_cannot_be_written_is_named_odometer_and_nothing_trains(tmp_path):
    from client.client_app import app

    folder = _image_folder(tmp_path / "data")
    (tmp_path / "not-a-folder").write_text("")
    context = _context({"data-source": "folder", "data-path": str(folder),
                        "odometer-path": str(tmp_path / "not-a-folder" / "odometer.jsonl")}, tmp_path)
    reply = app(_message("train", _train_content()), context)
    assert reply.has_error() and reply.error.reason == "odometer: hospital-x"


def test_a_failed_reply_is_named_by_the_hospital_it_gives_unless_another_node_holds_that_name(tmp_path):
    from flwr.app import Error, Message

    from server.ledger import PrivacyLedger
    from server.replies import RoundPlan
    from server.strategy import PrivateFedAvg, failure_category

    strategy = PrivateFedAvg(PrivacyLedger(tmp_path / "ledger.jsonl"), RoundPlan(32, 1.0, 0.5, 0.5, 1.0),
                             tmp_path / "rejected.jsonl")
    failed = Message(Error(code=2, reason="data: st-marys"), reply_to=_message("train", _train_content()))
    assert failure_category(failed) == "data" and strategy.label(5, failed) == "st-marys"
    strategy.node_names["9"] = "st-marys"
    assert strategy.label(5, failed) == "node 5"  # a name bound to another node is not taken over
    garbled = Message(Error(code=2, reason="data: h\x1b[2J"), reply_to=_message("train", _train_content()))
    assert strategy.label(6, garbled) == "node 6"
