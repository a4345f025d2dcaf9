"""``xn.from_arch`` and ``xpnet train --arch SPEC``: the grammar read into layers, the shape followed
through them, one clear line for each malformed spec, and a run of an --arch network that trains,
resumes bit for bit, evaluates, predicts and plots (on a small slice of MNIST written as IDX files)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from conftest import assert_one_line_error, train_json, write_mnist_slice
from typer.testing import CliRunner

import xpnet as xn
from cli.app import app
from xpnet.arch import arch_takes_images, canonical_arch, plan_arch
from xpnet.data import load_dataset
from xpnet.io import load_checkpoint

CNN = "conv(32,3),relu,maxpool(2),conv(64,3),relu,maxpool(2),flatten,dropout(0.5),dense(10)"
CNN_BN = "conv(32,3,bias=0),bn,relu,maxpool(2),conv(64,3,bias=0),bn,relu,maxpool(2),flatten,dropout(0.5),dense(10)"
EXAMPLE = (
    "conv(32,3),relu,maxpool(2),conv(64,3,pad=same),bn,relu,res[conv(64,3,pad=same),bn,relu],"
    "maxpool(2),flatten,dropout(0.5),dense(10)"
)


def _types(layers):
    return [type(layer).__name__ for layer in layers]


# ------------------------------------------------------------------ the library
def test_the_cnn_spec_is_xn_cnn_layer_for_layer():
    model = xn.from_arch(CNN, seed=0)
    assert model.num_parameters() == 34_826
    assert model.config() == xn.cnn(seed=0).config()
    for key, value in xn.cnn(seed=0).state_dict().items():  # the same initialization from the same seed
        np.testing.assert_array_equal(model.device.to_host(model.state_dict()[key]), value, err_msg=key)
    with_bn = xn.from_arch(CNN_BN)
    assert with_bn.config() == xn.cnn(batch_norm=True).config()
    assert with_bn.num_parameters() == xn.cnn(batch_norm=True).num_parameters() == 34_826 - 32 - 64 + 2 * (32 + 64)


def test_shapes_are_followed_through_a_residual_block():
    plan = plan_arch(EXAMPLE, (1, 28, 28), 10)
    assert _types(plan.layers) == [
        "Conv2D",
        "ReLU",
        "MaxPool2D",
        "Conv2D",
        "BatchNorm",
        "ReLU",
        "Residual",
        "MaxPool2D",
        "Flatten",
        "Dropout",
        "Dense",
    ]
    conv1, conv2, bn, block, dense = (plan.layers[i] for i in (0, 3, 4, 6, 10))
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size, conv1.pad) == (1, 32, 3, 0)
    assert (conv2.in_channels, conv2.out_channels, conv2.padding, conv2.pad) == (32, 64, "same", 1)
    assert bn.features == 64
    assert _types(block.sublayers) == ["Conv2D", "BatchNorm", "ReLU"]
    assert block.sublayers[0].in_channels == 64 and block.sublayers[1].features == 64
    # 28 → conv 26 → pool 13 → same 13 → block 13 → pool 6: 64·6·6 features
    assert (dense.in_features, dense.out_features) == (64 * 6 * 6, 10)
    by_hand = 32 * (9 + 1) + 64 * (32 * 9 + 1) + 2 * 64 + 64 * (64 * 9 + 1) + 2 * 64 + (64 * 36 + 1) * 10
    assert plan.parameters == by_hand == 79_050
    model = xn.from_arch(EXAMPLE, seed=1)
    assert model.num_parameters() == by_hand
    assert "6.0.W" in model.named_parameters() and "6.1.running_mean" in model.named_state()
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    assert model.forward(x).shape == (4, 10)


def test_layer_arguments_by_position_and_by_name():
    plan = plan_arch("avgpool(3,2),maxpool(size=2,stride=1),conv(4,2,2,1,0),gap,dense(3,bias=0)", (2, 12, 12), 3)
    avg, mx, conv, gap, dense = plan.layers
    assert (avg.size, avg.stride, mx.size, mx.stride) == (3, 2, 2, 1)
    # 12 → avgpool 3/2 → 5 → maxpool 2/1 → 4 → conv k2 s2 p1 → 3
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.pad, conv.bias) == (
        2,
        4,
        2,
        2,
        1,
        False,
    )
    assert type(gap).__name__ == "GlobalAvgPool2D" and (dense.in_features, dense.bias) == (4, False)
    assert plan.parameters == 4 * 2 * 2 * 2 + 3 * 4
    assert plan.activations == 2 * 5 * 5 + 2 * 4 * 4 + 4 * 3 * 3 + 4 + 3
    (leaky, norm, last) = plan_arch("leaky_relu(0.2),bn(eps=0.001,momentum=0.5),dense(1)", (7,), 1).layers
    assert leaky.alpha == 0.2 and (norm.features, norm.eps, norm.momentum) == (7, 0.001, 0.5)
    assert (last.in_features, last.out_features) == (7, 1)


def test_rows_need_no_image_layers_and_whitespace_and_case_do_not_matter():
    spec = " Dense( 16 ) , BN , tanh,\tdropout( rate = 0.25 ) , dense(2) "
    assert canonical_arch(spec) == "dense(16),bn,tanh,dropout(rate=0.25),dense(2)"
    assert not arch_takes_images(spec) and arch_takes_images("res[flatten],dense(2)") is True
    model = xn.from_arch(spec, input_shape=(30,), n_outputs=2)
    assert _types(model.layers) == ["Dense", "BatchNorm", "Tanh", "Dropout", "Dense"]
    assert model.config() == xn.from_arch(canonical_arch(spec), input_shape=(30,), n_outputs=2).config()
    assert model.num_parameters() == 30 * 16 + 16 + 2 * 16 + 16 * 2 + 2
    assert plan_arch("conv(4,3)", (1, 8, 8), None).output_shape == (4, 6, 6)  # n_outputs None: any ending


def test_an_arch_network_trains_through_its_residual_block_and_batchnorm():
    rng = np.random.default_rng(0)
    x = rng.random((32, 1, 8, 8), dtype=np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0.5).astype(np.int64)
    model = xn.from_arch("conv(4,3,pad=same),bn,relu,res[conv(4,3,pad=same),bn,relu],gap,dense(2)", (1, 8, 8), 2)
    before = {k: np.array(model.device.to_host(v)) for k, v in model.state_dict().items()}
    history = xn.fit(model, "cross_entropy", xn.Adam(1e-2), x, y, epochs=2, batch_size=16)
    assert len(history) == 2 and np.isfinite(history.history["loss"]).all()
    after = model.state_dict()
    for key in ("3.0.W", "3.1.gamma", "3.1.running_mean", "5.W"):  # inside the block, and after it
        assert not np.array_equal(model.device.to_host(after[key]), before[key]), key


SPEC_ERRORS = [
    ("", "the architecture is empty: give its layers separated by commas, such as conv(32,3),relu,flatten,dense(10)"),
    ("  \t ", "the architecture is empty"),
    ("convv(3,3),flatten,dense(10)", "unknown layer 'convv' at character 1; the layers are conv, maxpool, avgpool"),
    ("flatten,softmax,dense(10)", "unknown layer 'softmax' at character 9;"),
    ("conv(32,3", "'(' at character 5 is never closed"),
    ("res[relu,flatten,dense(10)", "'[' at character 4 is never closed"),
    ("relu],flatten,dense(10)", "']' at character 5 closes nothing"),
    ("flatten),dense(10)", "')' at character 8 closes nothing"),
    ("res[conv(8,3,pad=same)),relu]", "'[' at character 4 is closed by ')' at character 23"),
    ("conv(32 3),flatten,dense(10)", "expected ',' or ')' at character 9, got '3'"),
    ("flatten dense(10)", "expected ',' between layers at character 9, got 'dense'"),
    ("flatten,dense(10),", "expected a layer at character 19, got the end of the spec"),
    ("flatten,,dense(10)", "expected a layer at character 9, got ','"),
    ("flatten,dense(,10)", "expected an argument at character 15, got ','"),
    ("a@b", "unexpected character '@' at character 2"),
    ("res,flatten,dense(10)", "res at character 1 needs its layers in brackets"),
    ("res[],flatten,dense(10)", "res[] at character 1 is empty: a residual block needs at least one layer"),
    ("conv[3],flatten,dense(10)", "'[' at character 5: only res takes layers in brackets"),
    ("res[" * 33 + "relu" + "]" * 33 + ",flatten,dense(10)", "res blocks nest more than 32 deep at character 132"),
    # arguments
    ("conv(32),flatten,dense(10)", "conv(32) at character 1: conv needs kernel (conv(channels, kernel, stride=1"),
    ("flatten,dense()", "dense() at character 9: dense needs units (dense(units, bias=1))"),
    ("conv(3,3,1,0,1,9),flatten,dense(10)", "conv(3,3,1,0,1,9) at character 1: conv takes at most 5 arguments"),
    ("relu(1),flatten,dense(10)", "relu(1) at character 1: relu takes no arguments"),
    ("conv(3,3,size=2),flatten,dense(10)", "conv(3,3,size=2) at character 1: conv has no argument 'size'"),
    (
        "conv(3,3,stride=1,stride=2),flatten,dense(10)",
        "conv(3,3,stride=1,stride=2) at character 1: stride is given twice",
    ),
    ("conv(channels=3,3),flatten,dense(10)", "at character 1: an unnamed argument after a named one"),
    (
        "conv(32,x),flatten,dense(10)",
        "conv(32,x) at character 1: kernel must be a positive integer up to 1,048,576, got 'x'",
    ),
    ("conv(0,3),flatten,dense(10)", "channels must be a positive integer up to 1,048,576, got '0'"),
    (
        "conv(8,3,pad=full),flatten,dense(10)",
        "pad must be a non-negative integer up to 1,048,576, same or valid, got 'full'",
    ),
    ("conv(8,2,pad=same),flatten,dense(10)", "conv(8,2,pad=same) at character 1: Conv2D padding 'same' needs"),
    ("flatten,dense(10,bias=2)", "dense(10,bias=2) at character 9: bias must be 0 or 1, got '2'"),
    ("flatten,dropout(1.5),dense(10)", "dropout(1.5) at character 9: rate must be a number in [0, 1), got '1.5'"),
    ("flatten,dense(1048577),dense(10)", "units must be a positive integer up to 1,048,576, got '1048577'"),
    ("conv(2,3,stride=18446744073709551616),flatten,dense(10)", "stride must be a positive integer up to 1,048,576"),
    ("conv(2,3),leaky_relu(alpha=1e999),flatten,dense(10)", "alpha must be a finite number, got '1e999'"),
    ("flatten,dense(2.5),dense(10)", "units must be a positive integer up to 1,048,576, got '2.5'"),
    (
        "bn(momentum=2),flatten,dense(10)",
        "bn(momentum=2) at character 1: BatchNorm momentum must be a number in (0, 1]",
    ),
    # shapes
    ("conv(8,29),flatten,dense(10)", "conv(8,29) at character 1: its 29×29 kernel is larger than the 28×28 images"),
    ("conv(8,31,pad=1),flatten,dense(10)", "its 31×31 kernel is larger than the 28×28 images it gets (padded by 1"),
    (
        "maxpool(2),maxpool(15),flatten,dense(10)",
        "maxpool(15) at character 12: its 15×15 window is larger than the 14×14",
    ),
    (
        "dense(10)",
        "dense(10) at character 1: dense takes rows of features, but gets images (1 channel of 28×28): add flatten",
    ),
    ("flatten,conv(8,3),dense(10)", "conv(8,3) at character 9: conv takes images (channels, height, width), but gets"),
    ("gap,gap,dense(10)", "gap at character 5: gap takes images"),
    (
        "res[conv(8,3)],flatten,dense(10)",
        "res[conv(8,3)] at character 1: its layers turn 1 channel of 28×28 into 8 channels of 26×26, but a residual",
    ),
    ("flatten,res[dense(5)],dense(10)", "res[dense(5)] at character 9: its layers turn 784 features into 5 features"),
    (
        "conv(8,3),relu",
        "the last layer must be dense(10), which gives the 10 outputs the loss reads; the spec ends "
        "with relu at character 11: add flatten,dense(10)",
    ),
    ("flatten,dense(5)", "the spec ends with dense(5) at character 9"),
    ("flatten,dense(10),relu", "the spec ends with relu at character 19: add dense(10)"),
    ("flatten,res[dense(784),relu]", "the spec ends with res[dense(784),relu] at character 9: add dense(10)"),
]


@pytest.mark.parametrize("spec, message", SPEC_ERRORS)
def test_each_malformed_spec_is_one_line_naming_where(spec, message):
    with pytest.raises(xn.ArchError) as caught:
        xn.from_arch(spec)
    text = str(caught.value)
    assert isinstance(caught.value, ValueError) and "\n" not in text
    assert message in text, text


def test_a_long_layer_is_shortened_in_messages_and_input_shape_is_checked():
    layer = "conv(channels=8,kernel=7,stride=1,pad=valid,bias=1)"
    with pytest.raises(xn.ArchError) as caught:
        xn.from_arch(layer + ",flatten,dense(10)", (1, 4, 4))
    assert str(caught.value) == f"{layer[:37]}... at character 1: its 7×7 kernel is larger than the 4×4 images it gets"
    for shape in [(1, 28), (0,), (1, 28, 28.0), "28", (True,)]:
        with pytest.raises(ValueError, match="input_shape must be"):
            xn.from_arch("dense(10)", shape)


# ------------------------------------------------------------------ the command line
runner = CliRunner()
SMALL_ARCH = "conv(8,3),bn,relu,maxpool(2),res[conv(8,3,pad=same),bn,relu],flatten,dropout(0.25),dense(10)"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def small_mnist(tmp_path_factory):
    """400 training and 100 test images of MNIST, as the four IDX files."""
    return write_mnist_slice(tmp_path_factory.mktemp("small-mnist-arch"), 400, 100)


def _train(folder, run, *extra):
    return train_json(invoke, folder, run, *extra)


def test_an_arch_run_trains_resumes_evaluates_predicts_and_plots(small_mnist, tmp_path):
    spaced = " " + SMALL_ARCH.replace(",", " , ").replace("(", "( ") + " "
    whole = _train(small_mnist, tmp_path / "whole", "--arch", spaced, "--epochs", 2)
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["model"] == "arch" and config["arch"] == SMALL_ARCH  # written back without whitespace
    saved = load_checkpoint(tmp_path / "whole" / "checkpoint.safetensors")
    assert saved.meta["model"] == xn.from_arch(SMALL_ARCH).config()
    assert [layer["type"] for layer in saved.meta["model"]["layers"]][:5] == [
        "Conv2D",
        "BatchNorm",
        "ReLU",
        "MaxPool2D",
        "Residual",
    ]
    assert "4.1.running_mean" in saved.model and whole["parameters"] == xn.from_arch(SMALL_ARCH).num_parameters()

    _train(small_mnist, tmp_path / "part", "--arch", SMALL_ARCH, "--epochs", 1)
    result = invoke("train", "--resume", tmp_path / "part", "--epochs", 2, "--json")
    assert result.exit_code == 0, result.output
    resumed = load_checkpoint(tmp_path / "part" / "checkpoint.safetensors")
    for key, value in saved.model.items():  # parameters and the running statistics, in and out of the block
        np.testing.assert_array_equal(resumed.model[key], value, err_msg=key)
    assert json.loads(result.stdout)["test_accuracy"] == whole["test_accuracy"]
    assert_one_line_error(
        invoke("train", "--resume", tmp_path / "part", "--arch", CNN, "--epochs", 3),
        2,
        r"--arch cannot change when resuming",
    )
    assert_one_line_error(
        invoke("train", "--resume", tmp_path / "part", "--model", "cnn", "--epochs", 3),
        2,
        r"the run's network is its --arch spec; --model cnn names another",
    )

    report = invoke("evaluate", tmp_path / "whole", "--json")
    assert report.exit_code == 0, report.output
    assert json.loads(report.stdout)["accuracy"] == pytest.approx(whole["test_accuracy"])
    rows = load_dataset("mnist", flatten=False).test.x[:3].reshape(3, -1)
    np.save(tmp_path / "rows.npy", rows)
    predicted = invoke("predict", tmp_path / "whole", tmp_path / "rows.npy")
    assert predicted.exit_code == 0, predicted.output
    assert len(predicted.stdout.splitlines()) == 3
    pytest.importorskip("matplotlib")
    plotted = invoke("plot", tmp_path / "whole")
    assert plotted.exit_code == 0, plotted.output
    names = sorted(path.name for path in (tmp_path / "whole" / "plots").glob("*.png"))
    assert names == ["confusion.png", "curves.png", "first_layer_weights.png", "misclassified.png"]


def test_an_arch_of_rows_trains_on_mnist_and_wdbc(small_mnist, tmp_path):
    rows = _train(small_mnist, tmp_path / "mlp", "--arch", "dense(32),relu,dense(10)", "--epochs", 1)
    assert rows["parameters"] == 784 * 32 + 32 + 32 * 10 + 10
    wdbc = ["--dataset", "wdbc", "--arch", "dense(8),bn,tanh,dropout(0.1),dense(1)", "--batch-size", 32]
    result = invoke("train", *wdbc, "--epochs", 2, "--out", tmp_path / "wdbc", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["parameters"] == 30 * 8 + 8 + 16 + 8 + 1
    assert invoke("evaluate", tmp_path / "wdbc").exit_code == 0
    np.save(tmp_path / "row.npy", np.zeros((1, 30)))
    assert invoke("predict", tmp_path / "wdbc", tmp_path / "row.npy").exit_code == 0


def test_a_run_saved_before_arch_existed_still_loads(tmp_path):
    run = tmp_path / "old"
    result = invoke("train", "--dataset", "wdbc", "--hidden", "4", "--epochs", 1, "--out", run, "--json")
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["arch"] is None
    del config["arch"]
    (run / "config.json").write_text(json.dumps(config))
    assert invoke("evaluate", run).exit_code == 0
    resumed = invoke("train", "--resume", run, "--epochs", 2, "--json")
    assert resumed.exit_code == 0, resumed.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--arch", "conv(32,3"], "--arch: '(' at character 5 is never closed"),
        (["--arch", "convv(3,3),flatten,dense(10)"], "--arch: unknown layer 'convv' at character 1"),
        (
            ["--arch", "conv(8,3),dense(10)"],
            "--arch: dense(10) at character 11: dense takes rows of features, but gets "
            "images (8 channels of 26×26): add flatten (or gap) before it",
        ),
        (["--arch", "flatten,dense(7)"], "--arch: the last layer must be dense(10)"),
        (["--arch", "res[conv(8,3)],flatten,dense(10)"], "--arch: res[conv(8,3)] at character 1: its layers turn"),
        (["--arch", ""], "--arch: the architecture is empty"),
        (["--arch", CNN, "--model", "cnn"], "--arch gives the whole network; --model cnn names another"),
        (["--arch", CNN, "--model", "mlp"], "--arch gives the whole network; --model mlp names another"),
        (["--model", "arch"], "--model arch is the network of an --arch SPEC: give --arch"),
        (["--arch", CNN, "--hidden", "32"], "--hidden does not apply to --arch: write dense(N) layers into the spec"),
        (["--arch", CNN, "--activation", "tanh"], "--activation does not apply to --arch"),
        (["--arch", CNN, "--dropout", "0.2"], "--dropout does not apply to --arch: write dropout(RATE) into the spec"),
        (
            ["--arch", CNN, "--dataset", "wdbc"],
            "--arch with conv, maxpool, avgpool, gap, flatten layers takes images; wdbc is a table of 30 features",
        ),
        (["--arch", "dense(8),relu,dense(10)", "--dataset", "wdbc"], "--arch: the last layer must be dense(1)"),
    ],
)
def test_a_bad_arch_is_one_line_and_exit_2_before_anything_is_written(small_mnist, tmp_path, args, message):
    run = tmp_path / "run"
    data = [] if "wdbc" in args else ["--data-dir", small_mnist]
    result = invoke("train", *data, *args, "--out", run)
    assert_one_line_error(result, 2, "^xpnet: " + re.escape(message))
    assert not run.exists()


def test_the_console_script_reports_a_bad_arch_in_one_line(tmp_path):
    script = shutil.which("xpnet")
    if script is None:
        pytest.skip("xpnet is not installed as a console script here (pip install -e .)")
    bad = subprocess.run(
        [script, "train", "--arch", "conv(32,3),relu]", "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr == "xpnet: --arch: ']' at character 16 closes nothing\n"


def test_train_help_shows_arch():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.stdout.split())
    assert "--arch SPEC a network of your own, such as conv(32,3),relu,maxpool(2),flatten,dense(10)" in text
