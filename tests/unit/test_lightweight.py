"""Lightweight models: the MobileNetV3-Small student is torchvision's network, the 3-D teacher runs on
the same slabs, both export to ONNX with parity, and the distillation loss is the seed's formula."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from dicomops.config import PreprocessConfig, TrainConfig
from dicomops.export import onnx_export, qat
from dicomops.export.contract import METADATA_KEY, InputContract
from dicomops.training.data import SlabSet
from dicomops.training.distill import distillation_loss
from dicomops.training.mobilenet import MobileNetV3Small, make_divisible
from dicomops.training.model import build_model
from dicomops.training.saliency import input_channels, saliency_map

SIZE = 32
nn_hard = {torch.nn.Hardswish, torch.nn.Hardsigmoid}


def test_student_is_torchvisions_mobilenet_v3_small() -> None:
    # torchvision's mobilenet_v3_small() (3 channels, 1000 classes) has 2,542,856 parameters; every
    # block width, squeeze size and the classifier's 1024 units must agree for the count to match.
    assert sum(p.numel() for p in MobileNetV3Small(3, 1000).parameters()) == 2_542_856
    assert [make_divisible(c // 4) for c in (16, 96, 240, 120, 144, 288, 576)] == [8, 24, 64, 32, 40, 72, 144]
    student = build_model(TrainConfig(architecture="mobilenet-v3-small"), 5).eval()
    assert student(torch.zeros(4, 5, 128, 128)).shape == (4, 2)
    assert input_channels(student) == 5
    with pytest.raises(RuntimeError):  # the first convolution takes the slab's slices, no other count
        student(torch.zeros(1, 3, 128, 128))


def test_students_stem_stride_comes_from_the_config() -> None:
    # At stride 1 the student keeps twice the resolution all the way down: 128 px ends in 8x8
    # features instead of 4x4 (a 6 mm nodule is 2.4 px at 128 px; stride 2 loses it).
    x = torch.zeros(1, 3, 128, 128)
    for stride, side in ((2, 4), (1, 8)):
        student = build_model(TrainConfig(architecture="mobilenet-v3-small", stem_stride=stride), 3).eval()
        assert student.features[0][0].stride == (stride, stride)
        assert student.features(x).shape[-2:] == (side, side)
        assert student(x).shape == (1, 2)
    # The parameters do not change with the stride: one network, two resolutions.
    assert sum(p.numel() for p in MobileNetV3Small(3, 1000, stem_stride=1).parameters()) == 2_542_856


def test_minimal_student_is_the_minimalistic_variant_of_the_same_network() -> None:
    # The minimalistic variant is torchvision's network less its squeeze-excitation blocks and with
    # 3x3 instead of 5x5 depthwise kernels: its parameter count follows from torchvision's by hand.
    full, minimal = MobileNetV3Small(3, 1000), MobileNetV3Small(3, 1000, minimal=True)
    from dicomops.training.mobilenet import SMALL

    squeeze = sum(2 * e * make_divisible(e // 4) + make_divisible(e // 4) + e for _, _, e, _, se, _, _ in SMALL if se)
    depthwise = sum(e * (k * k - 9) for _, k, e, _, _, _, _ in SMALL)
    assert sum(p.numel() for p in minimal.parameters()) == 2_542_856 - squeeze - depthwise == 2_044_736
    kinds = {type(m) for m in minimal.modules()}
    assert nn_hard.isdisjoint(kinds) and torch.nn.ReLU in kinds
    assert nn_hard & {type(m) for m in full.modules()}
    depthwise_kernels = {m.kernel_size for m in minimal.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1}
    assert depthwise_kernels == {(3, 3)}
    student = build_model(TrainConfig(architecture="mobilenet-v3-small-minimal"), 3).eval()
    assert TrainConfig(architecture="mobilenet-v3-small-minimal").input_size == 128  # the student's defaults
    assert student.features[0][0].stride == (1, 1) and student(torch.zeros(2, 3, 128, 128)).shape == (2, 2)
    # It trains: one step in training mode, dropout and all, back-propagates (the head's ReLU must
    # not be overwritten by an in-place dropout after it).
    student.train()
    loss = torch.nn.functional.cross_entropy(student(torch.rand(4, 3, 64, 64)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())


def test_minimal_students_int8_graph_has_no_float_activations(tmp_path: Path) -> None:
    # INT8 of the full student leaves its squeeze-excitation gates and hard-swishes in float
    # (dequantise, float op, quantise again); the minimalistic variant has none left to do so.
    from dicomops.export import quantize

    x = np.random.default_rng(0).random((8, 3, SIZE, SIZE), dtype=np.float32)
    float_ops = {"HardSigmoid", "HardSwish", "Mul", "Sigmoid"}
    found = {}
    for architecture in ("mobilenet-v3-small", "mobilenet-v3-small-minimal"):
        cfg = TrainConfig(architecture=architecture, input_size=SIZE)
        model = build_model(cfg, 3).eval()
        contract = InputContract.from_configs(PreprocessConfig(), cfg, 0.5)
        fp32 = onnx_export.export_onnx(model, contract, tmp_path / f"{architecture}.onnx", opset=18)
        assert onnx_export.check_parity(model, fp32, x, 1e-4).max_abs_diff < 1e-4
        int8 = quantize.quantize_int8(fp32, tmp_path / f"{architecture}.int8.onnx", x)
        found[architecture] = {n.op_type for n in onnx.load(int8).graph.node} & float_ops
    assert found["mobilenet-v3-small"] >= {"HardSigmoid", "Mul"}  # hard-swish is exported as x * HardSigmoid(x)
    assert found["mobilenet-v3-small-minimal"] == set()
    # Its global pool too: exported as the GlobalAveragePool it is (torch writes a ReduceMean, which
    # ONNX Runtime runs in float behind a transpose), it runs as an integer operator.
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    runs = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert "QLinearGlobalAveragePool" in runs and "ReduceMean" not in runs


def test_spatial_means_become_global_average_pools_and_nothing_else() -> None:
    from onnx import TensorProto, helper, numpy_helper

    def graph(axes: list[int], keepdims: int, rank: int = 4) -> onnx.ModelProto:
        shape = [2, 3, 5, 5, 5][:rank]
        out = shape[:2] + [1] * (rank - 2) if keepdims else shape[:2]
        nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["y"], "mean", keepdims=keepdims)]
        return helper.make_model(helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
            [numpy_helper.from_array(np.array(axes, np.int64), "axes")]), opset_imports=[helper.make_opsetid("", 18)])

    x = np.random.default_rng(0).random((2, 3, 5, 5), dtype=np.float32)
    pooled = graph([2, 3], 1)
    assert onnx_export.global_average_pools(pooled) == 1
    assert [n.op_type for n in pooled.graph.node] == ["GlobalAveragePool"] and not pooled.graph.initializer
    import onnxruntime as ort

    y = ort.InferenceSession(pooled.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x.mean(axis=(2, 3), keepdims=True), rtol=1e-6)
    # Over other axes, without the kept dimensions or on a volume it is another operation: left alone.
    assert onnx_export.global_average_pools(graph([-1, -2], 1)) == 1  # the same axes, counted from the end
    for other in (graph([1, 2], 1), graph([2, 3], 0), graph([2, 3, 4], 1, rank=5)):
        assert onnx_export.global_average_pools(other) == 0
        assert [n.op_type for n in other.graph.node] == ["ReduceMean"] and len(other.graph.initializer) == 1


def test_students_eval_mode_keeps_up_with_its_training() -> None:
    # After 40 training steps on inputs of a new scale, the running statistics the network uses in
    # eval mode have reached the batches' (torchvision's momentum 0.01 gets a third of the way).
    torch.manual_seed(0)
    student = build_model(TrainConfig(architecture="mobilenet-v3-small"), 3).train()
    first = student.features[0][1]
    assert isinstance(first, torch.nn.BatchNorm2d) and first.momentum == 0.1
    x = 3 + 2 * torch.rand(8, 3, 64, 64)
    with torch.no_grad():
        target = student.features[0][0](x).mean(dim=(0, 2, 3))
        for _ in range(40):
            student(x)
    assert torch.allclose(first.running_mean, target, rtol=0.05, atol=1e-3)


def test_teacher_is_a_3d_network_over_the_slab() -> None:
    teacher = build_model(TrainConfig(architecture="resnet3d-slim"), 7).eval()
    assert any(isinstance(m, torch.nn.Conv3d) for m in teacher.modules())
    assert not any(isinstance(m, torch.nn.Conv2d) for m in teacher.modules())
    assert input_channels(teacher) == 7
    x = torch.rand(3, 7, SIZE, SIZE)
    out = teacher(x)
    assert out.shape == (3, 2)
    # The depth axis is the slab's slices: reversing them changes the output (a 2-D network would
    # see them as unordered channels only through its first layer; here every layer sees depth).
    assert not torch.allclose(out, teacher(x.flip(1)))
    heat = saliency_map(teacher, x[0])
    assert heat.shape == (SIZE, SIZE) and heat.min() >= 0.0 and heat.max() <= 1.0


def _hand_kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=True))


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_distillation_loss_is_the_seeds_formula() -> None:
    student = torch.tensor([[2.0, 0.0], [0.5, 1.5]])
    teacher = torch.tensor([[0.0, 1.0], [-1.0, 2.0]])
    labels = torch.tensor([1, 1])
    t = 3.0
    # By hand: cross-entropy on the labels, KL(teacher_T || student_T) times T^2, batch means.
    ce = (math.log(1 + math.exp(2.0)) + math.log(1 + math.exp(-1.0))) / 2
    kl = (_hand_kl(_softmax([0 / t, 1 / t]), _softmax([2 / t, 0 / t]))
          + _hand_kl(_softmax([-1 / t, 2 / t]), _softmax([0.5 / t, 1.5 / t]))) / 2
    expected = 0.7 * ce + 0.3 * t * t * kl
    got = distillation_loss(student, labels, teacher, alpha=0.7, temperature=t)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert float(got) == pytest.approx(1.0849852, rel=1e-6)  # CE 1.2200948, KL 0.0855255: the same, written out
    # alpha 1 is plain cross-entropy; a student equal to its teacher pays no KL.
    assert float(distillation_loss(student, labels, teacher, alpha=1.0, temperature=t)) == pytest.approx(ce)
    assert float(distillation_loss(student, labels, student, alpha=0.0, temperature=t)) == pytest.approx(0.0, abs=1e-7)
    # Class weights reach the label term as in training without a teacher.
    weight = torch.tensor([1.0, 3.0])
    weighted = distillation_loss(student, torch.tensor([0, 1]), teacher, alpha=1.0, temperature=t, weight=weight)
    by_hand = (1 * math.log(1 + math.exp(-2.0)) + 3 * math.log(1 + math.exp(-1.0))) / 4
    assert float(weighted) == pytest.approx(by_hand, rel=1e-6)


def test_distillation_moves_the_student_towards_the_teacher() -> None:
    torch.manual_seed(0)
    student = torch.zeros(8, 2, requires_grad=True)
    teacher = torch.tensor([[3.0, -3.0]] * 8)
    labels = torch.ones(8, dtype=torch.long)
    distillation_loss(student, labels, teacher, alpha=0.0, temperature=3.0).backward()
    assert student.grad is not None and (student.grad[:, 0] < 0).all()  # gradient descent raises class 0


@pytest.mark.parametrize(("architecture", "k"), [("mobilenet-v3-small", 3), ("resnet3d-slim", 5)])
def test_lightweight_networks_export_with_parity(architecture: str, k: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = TrainConfig(architecture=architecture, input_size=SIZE)
    model = build_model(cfg, k)
    model.train()
    with torch.no_grad():  # batch-norm statistics away from their initial values
        for _ in range(3):
            model(torch.rand(16, k, SIZE, SIZE) * 2 + 0.5)
    model.eval()
    contract = InputContract.from_configs(PreprocessConfig(slab_slices=k), cfg, 0.5)
    path = onnx_export.export_onnx(model, contract, tmp_path / "m.onnx", opset=18)
    x = np.random.default_rng(1).random((9, k, SIZE, SIZE), dtype=np.float32)
    parity = onnx_export.check_parity(model, path, x, 1e-4)
    assert parity.max_abs_diff < 1e-4 and parity.samples == 9
    assert onnx_export.read_contract(path).channels == k


def _tiny_slabs(n: int = 64, k: int = 3, seed: int = 0) -> SlabSet:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.random((n, k, SIZE, SIZE), dtype=np.float32) * 0.5
    x[y == 1, :, 12:20, 12:20] += 0.5  # a bright square makes the positives learnable
    return SlabSet(torch.from_numpy(x).half(), torch.from_numpy(y), ["s"] * n, np.arange(n))


def test_qat_prepares_monai_resnet_only_with_one_partition_per_call() -> None:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    model = build_model(TrainConfig(architecture="resnet-slim", input_size=SIZE), 3).eval()
    example = torch.rand(2, 3, SIZE, SIZE)
    program = torch.export.export(model, (example,)).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    # MONAI's blocks call one ReLU module twice: without the pass the quantiser refuses the graph.
    with pytest.raises(ValueError, match="more than one output node"):
        prepare_qat_pt2e(program, quantizer)
    prepared = qat.prepare(model, example)
    fake = [n for n in prepared.graph.nodes if n.op == "call_module" and "activation_post_process" in str(n.target)]
    assert len(fake) >= 8  # fake quantisers on the activations of every stage


@pytest.mark.parametrize(("architecture", "convs"), [
    ("resnet-slim", 12), pytest.param("mobilenet-v3-small", 52, marks=pytest.mark.slow)])
def test_qat_exports_qdq_graphs_with_int8_per_channel_weights(architecture: str, convs: int, tmp_path: Path) -> None:
    from onnx import numpy_helper

    cfg = TrainConfig(architecture=architecture, input_size=SIZE)
    model = build_model(cfg, 3)
    contract = InputContract.from_configs(PreprocessConfig(), cfg, 0.5)
    data = _tiny_slabs()
    int8, qdq = qat.quantize_qat(model, contract, data, tmp_path, opset=18, epochs=1, learning_rate=1e-3,
                                 calibration=data.x[:32].float().numpy())
    assert not (tmp_path / "model.qat-fp32.onnx").exists()
    for path in (int8, qdq):
        graph = onnx.load(path).graph
        inits = {i.name: i for i in graph.initializer}
        producers = {out: n for n in graph.node for out in n.output}
        found = [n for n in graph.node if n.op_type == "Conv"]
        assert len(found) == convs, path.name  # every convolution (squeeze-excitation's included) ...
        for conv in found:  # ... reads a dequantised activation and dequantised int8 per-channel weights
            activation, weight = (producers.get(i) for i in conv.input[:2])
            assert activation is not None and activation.op_type == "DequantizeLinear", (path.name, conv.name)
            assert weight is not None and weight.op_type == "DequantizeLinear", (path.name, conv.name)
            values, scales = (numpy_helper.to_array(inits[i]) for i in weight.input[:2])
            assert values.dtype == np.int8 and scales.size == values.shape[0] > 1, (path.name, conv.name)
        activations = [numpy_helper.to_array(inits[n.input[2]]).dtype for n in graph.node
                       if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits]
        assert activations and set(activations) == {np.dtype(np.uint8)}  # uint8 activations, x86's fast path
    x = data.x[:16].float().numpy()
    assert onnx_export.run_onnx(onnx_export.session(int8), x).shape == (16, 2)


def _integer_ops(path: Path, tmp_path: Path) -> set[str]:
    """The operator types of the graph ONNX Runtime really runs for `path` (after its QDQ fusions)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.optimised.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}


# The minimal student does not learn the toy task from scratch in three epochs; what is served must
# still score as its program does.
@pytest.mark.parametrize(("architecture", "learns"), [("resnet-slim", True), ("mobilenet-v3-small-minimal", False)])
def test_qat_serves_the_ranges_it_learnt_integer_end_to_end(architecture: str, learns: bool, tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    cfg = TrainConfig(architecture=architecture, input_size=SIZE)
    data = _tiny_slabs(128)
    _, converted = qat.finetune(build_model(cfg, 3), data, epochs=3, learning_rate=3e-3)
    held = _tiny_slabs(64, seed=1)
    x = held.x.float()
    with torch.no_grad():
        p_program = torch.softmax(converted(x), 1)[:, 1].numpy()
    if learns:
        assert roc_auc_score(held.y.numpy(), p_program) > 0.9  # the fine-tune learnt under fake quantisation
    contract = InputContract.from_configs(PreprocessConfig(), cfg, 0.5)
    int8, qdq = qat.export_converted(converted, contract, tmp_path, opset=18, calibration=data.x[:64].float().numpy())
    # What ONNX Runtime serves is torchao's program, its learnt ranges included: it scores as the
    # program does, not as the fine-tuned float weights re-quantised with new ranges would.
    p_int8 = onnx_export.run_onnx(onnx_export.session(int8), x.numpy())[:, 1]
    assert np.abs(p_int8 - p_program).max() < 0.02
    assert np.abs(p_int8 - onnx_export.run_onnx(onnx_export.session(qdq), x.numpy())[:, 1]).max() < 0.02
    # torchao leaves the convolutions before a residual addition in float (Inductor fuses conv+add);
    # ONNX Runtime would run those as float convolutions. In the served graph it runs none.
    assert {"Conv", "FusedConv"} & _integer_ops(qdq, tmp_path)
    ops = _integer_ops(int8, tmp_path)
    assert "QLinearConv" in ops and not {"Conv", "FusedConv"} & ops


def test_the_float_control_takes_the_qat_fine_tunes_steps_without_quantisation() -> None:
    cfg = TrainConfig(architecture="resnet-slim", input_size=SIZE)
    torch.manual_seed(0)
    model, data = build_model(cfg, 3).eval(), _tiny_slabs(64)
    x = _tiny_slabs(16, seed=1).x.float()

    def tuned(fake_quantise: bool) -> torch.nn.Module:
        return qat.finetune(model, data, epochs=1, learning_rate=3e-3, fake_quantise=fake_quantise)[0]

    control, again, quantised = tuned(False), tuned(False), tuned(True)
    # Augmented as the version's training was: a version flipped front to back too is fine-tuned so.
    both_axes = qat.finetune(model, data, epochs=1, learning_rate=3e-3, fake_quantise=False, flip_axes=(0, 1))[0]
    with torch.no_grad():
        outputs = [net(x) for net in (model, control, again, quantised, both_axes)]
    assert torch.equal(outputs[1], outputs[2])  # the same batches, augmentations and steps each time
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)  # it learnt
    # QAT took the same steps through fake quantisation: other gradients, other weights.
    assert not torch.allclose(outputs[1], outputs[3], atol=1e-3)
    assert not torch.allclose(outputs[1], outputs[4], atol=1e-5)  # other flips, other weights


def test_qat_keeps_the_trained_networks_batch_norm_statistics() -> None:
    # (resnet-slim: an untrained minimal student's activations die in eval mode, so nothing would learn)
    cfg = TrainConfig(architecture="resnet-slim", input_size=SIZE)
    model = build_model(cfg, 3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained, _ = qat.finetune(model, _tiny_slabs(64), epochs=1, learning_rate=1e-3)
    after = trained.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)  # served as trained
    weights = [k for k in before if k.endswith("weight") and before[k].dim() == 4]
    assert any(not torch.equal(before[k], after[k]) for k in weights)  # while the weights learnt


def test_qat_of_a_distilled_version_learns_from_its_teacher() -> None:
    from sklearn.metrics import roc_auc_score

    # A teacher that says the opposite of the labels, and all the weight on it (alpha 0): the
    # fine-tune must follow the teacher, as the version's own training did, not the labels.
    cfg = TrainConfig(architecture="resnet-slim", input_size=SIZE)
    data = _tiny_slabs(128)
    against = torch.stack([data.y.float(), 1 - data.y.float()], 1) * 8 - 4  # logits favour the other class
    teacher = qat.Teacher(against, alpha=0.0, temperature=1.0)
    with pytest.raises(ValueError, match="teacher outputs"):
        qat.finetune(build_model(cfg, 3), data, epochs=1, learning_rate=3e-3,
                     teacher=qat.Teacher(against[:5], 0.0, 1.0))
    _, taught = qat.finetune(build_model(cfg, 3), data, epochs=3, learning_rate=3e-3, teacher=teacher)
    _, labelled = qat.finetune(build_model(cfg, 3), data, epochs=3, learning_rate=3e-3)
    held = _tiny_slabs(64, seed=1)
    with torch.no_grad():
        p_taught = torch.softmax(taught(held.x.float()), 1)[:, 1].numpy()
        p_labelled = torch.softmax(labelled(held.x.float()), 1)[:, 1].numpy()
    assert roc_auc_score(held.y.numpy(), p_labelled) > 0.9
    assert roc_auc_score(held.y.numpy(), p_taught) < 0.1


def test_quantising_float_convolutions_leaves_learnt_ranges_alone(tmp_path: Path) -> None:
    from onnx import helper, numpy_helper

    # x -> Q/DQ (learnt range) -> Conv -> Add(x) -> y: the convolution's output is float.
    w = numpy_helper.from_array(np.full((1, 1, 1, 1), 2.0, np.float32), "w")
    inits = [w, numpy_helper.from_array(np.array(0.5, np.float32), "s"),
             numpy_helper.from_array(np.array(3, np.uint8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("Conv", ["xd", "w"], ["c"]), helper.make_node("Add", ["c", "xd"], ["y"])]
    info = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [None, 1, 2, 2]) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph(nodes, "g", info[:1], info[1:], inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    calibration = np.array([[[[-1.0, 0.0], [2.0, 4.0]]]], np.float32)  # exact at scale 0.5, zero point 3
    assert qat.quantise_float_convolutions(src, tmp_path / "out.onnx", calibration) == ["c"]
    out = onnx.load(str(tmp_path / "out.onnx")).graph
    inits_out = {i.name: numpy_helper.to_array(i) for i in out.initializer}
    assert inits_out["s"] == np.float32(0.5) and inits_out["z"] == 3  # the learnt range as it was
    # the new range spans the calibration's conv outputs: c = 2 xd in [-2, 8]
    assert inits_out["c_scale"] == pytest.approx(10 / 255) and inits_out["c_zero_point"] == round(2 / (10 / 255))
    add = next(n for n in out.node if n.op_type == "Add")
    assert list(add.input) == ["c_dq", "xd"]


def _int8_of(architecture: str, tmp_path: Path, **settings: int) -> tuple[Path, Path, np.ndarray]:
    """FP32 and post-training INT8 ONNX of an untrained network at SIZE px, and the calibration slabs."""
    from dicomops.export import quantize

    x = np.random.default_rng(0).random((16, 3, SIZE, SIZE), dtype=np.float32)
    cfg = TrainConfig(architecture=architecture, input_size=SIZE, **settings)
    torch.manual_seed(0)
    contract = InputContract.from_configs(PreprocessConfig(), cfg, 0.5)
    fp32 = onnx_export.export_onnx(build_model(cfg, 3).eval(), contract, tmp_path / f"{architecture}.onnx", opset=18)
    return fp32, quantize.quantize_int8(fp32, tmp_path / f"{architecture}.int8.onnx", x), x


def test_input_resolution_convolutions_are_the_stem_and_what_keeps_its_size(tmp_path: Path) -> None:
    from dicomops.export import quantize

    # The minimal student at stride 1: the stem and the first depthwise convolution read SIZE x SIZE
    # tensors (the depthwise one downsamples); the classifier's stride-2 stem is alone at that size.
    _, student, _ = _int8_of("mobilenet-v3-small-minimal", tmp_path)
    fp32, classifier, _ = _int8_of("resnet-slim", tmp_path, stem_stride=2)
    heads = {path.name: quantize.input_resolution_convolutions(path) for path in (student, classifier, fp32)}
    graph = {n.name: n for n in onnx.load(student).graph.node}
    assert len(heads[student.name]) == 2
    stem, depthwise = (graph[name] for name in heads[student.name])
    groups = {a.name: a.i for a in depthwise.attribute}.get("group", 1)
    assert groups > 1 and {a.name: list(a.ints) for a in depthwise.attribute}["strides"] == [2, 2]
    assert {a.name: a.i for a in stem.attribute}.get("group", 1) == 1
    assert len(heads[classifier.name]) == 1 and len(heads[fp32.name]) == 1  # QDQ or float, the same layer


def test_keep_in_float_runs_the_head_in_float_with_its_quantised_weights(tmp_path: Path) -> None:
    from onnx import numpy_helper

    from dicomops.export import quantize

    _, int8, x = _int8_of("mobilenet-v3-small-minimal", tmp_path)
    head = quantize.input_resolution_convolutions(int8)
    out = tmp_path / "head.onnx"
    quantize.keep_in_float(int8, out, head)
    quantize.keep_in_float(int8, tmp_path / "default.onnx")  # the head is what it keeps by default
    assert onnx.load(tmp_path / "default.onnx").graph == onnx.load(out).graph
    with pytest.raises(ValueError, match="no convolution"):
        quantize.keep_in_float(int8, tmp_path / "x.onnx", ["not-a-conv"])

    def runs(path: Path) -> list[str]:  # the operators ONNX Runtime really runs, after its fusions
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{path.stem}.optimised.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]

    before, after = runs(int8), runs(out)
    assert not {"Conv", "FusedConv"} & set(before)
    assert sum(op in ("Conv", "FusedConv") for op in after) == 2  # the head, in float
    assert after.count("QLinearConv") == before.count("QLinearConv") - 2  # the rest still integer
    graph = onnx.load(out).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    # the slab goes straight into the float stem: its quantise/dequantise pair is gone, and so is its
    # clip, because the contract promises [0, 1] and the pair held that (calibrated on [0, 1) slabs, to
    # within half a step) ...
    slab = graph.input[0].name
    assert not any(n.op_type in ("QuantizeLinear", "Clip") and n.input[0] == slab for n in graph.node)
    # ... which a contract promising more would not allow
    wider = onnx.load(int8)
    contract = dataclasses.replace(onnx_export.read_contract(int8), value_range=(0.0, 2.0))
    onnx_export.set_metadata(wider, {METADATA_KEY: contract.to_json()})
    onnx.save(wider, tmp_path / "wider.onnx")
    quantize.keep_in_float(tmp_path / "wider.onnx", tmp_path / "wider-head.onnx")
    clip = next(n for n in onnx.load(tmp_path / "wider-head.onnx").graph.node if slab in n.input)
    assert clip.op_type == "Clip"
    # the head's weights are the int8 values the integer kernel used, in float: on the per-channel grid
    original = {n.name: n for n in onnx.load(int8).graph.node}
    producers = {o: n for n in onnx.load(int8).graph.node for o in n.output}
    source = {i.name: numpy_helper.to_array(i) for i in onnx.load(int8).graph.initializer}
    for name in head:
        dq = producers[original[name].input[1]]
        scale = source[dq.input[1]].reshape(-1, 1, 1, 1)
        weight = inits[next(n for n in graph.node if n.name == name).input[1]]
        assert weight.dtype == np.float32 and np.allclose(weight / scale, np.round(weight / scale), atol=1e-3)
        np.testing.assert_allclose(weight / scale, source[dq.input[0]].astype(np.float32), atol=1e-3)
    p8 = onnx_export.run_onnx(onnx_export.session(int8), x)
    assert np.abs(onnx_export.run_onnx(onnx_export.session(out), x) - p8).max() < 0.05


def test_keep_in_float_keeps_the_clamp_a_dropped_relu_left_to_the_quantiser(tmp_path: Path) -> None:
    from onnx import helper, numpy_helper

    from dicomops.export import quantize

    # ONNX Runtime's quantiser removes a ReLU whose output is quantised from zero (uint8, zero point
    # 0): the pair clamps. x -> Q/DQ -> Conv a (no ReLU) -> Q/DQ at zero point 0 -> Conv b -> y, 1x1
    # convolutions over one channel: y = b * max(a * x, 0) within the ranges.
    def quantised(name: str, value: np.ndarray) -> list[onnx.TensorProto]:
        return [numpy_helper.from_array(np.round(value / 0.5).astype(np.int8), f"{name}_q"),
                numpy_helper.from_array(np.array(0.5, np.float32), f"{name}_s"),
                numpy_helper.from_array(np.array(0, np.int8), f"{name}_z")]

    inits = [*quantised("wa", np.full((1, 1, 1, 1), -2.0)), *quantised("wb", np.full((1, 1, 1, 1), 1.5)),
             numpy_helper.from_array(np.array(1 / 64, np.float32), "xs"),
             numpy_helper.from_array(np.array(128, np.uint8), "xz"),
             numpy_helper.from_array(np.array(8 / 255, np.float32), "as"),
             numpy_helper.from_array(np.array(0, np.uint8), "az")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             *(helper.make_node("DequantizeLinear", [f"{w}_q", f"{w}_s", f"{w}_z"], [f"{w}_d"]) for w in ("wa", "wb")),
             helper.make_node("Conv", ["xd", "wa_d"], ["a"], "conv_a"),
             helper.make_node("QuantizeLinear", ["a", "as", "az"], ["aq"]),
             helper.make_node("DequantizeLinear", ["aq", "as", "az"], ["ad"]),
             helper.make_node("Conv", ["ad", "wb_d"], ["y"], "conv_b")]
    info = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [None, 1, 2, 2]) for n in ("x", "y")]
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", info[:1], info[1:], inits),
                                opset_imports=[helper.make_opsetid("", 18)]), str(src))
    x = np.array([[[[-1.0, 0.5], [1.0, 1.5]]]], np.float32)
    quantize.keep_in_float(src, tmp_path / "both.onnx", ["conv_a", "conv_b"])
    def run(path: Path) -> np.ndarray:
        import onnxruntime as ort

        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    y = run(tmp_path / "both.onnx")
    # a = -2x is negative for x > 0, where the quantiser's pair gave 0; x is clipped to [-2, 1.98]
    np.testing.assert_allclose(y, 1.5 * np.clip(-2 * np.clip(x, -2, 127 / 64), 0, 8), atol=1e-6)
    np.testing.assert_allclose(run(src), y, atol=0.05)
    kinds = [n.op_type for n in onnx.load(tmp_path / "both.onnx").graph.node]
    assert kinds == ["Clip", "Conv", "Clip", "Conv"]  # no pair left, every weight a float initialiser


def test_float_head_is_kept_only_where_it_is_faster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomops.export import quantize

    _, int8, _ = _int8_of("mobilenet-v3-small-minimal", tmp_path)
    original = int8.read_bytes()
    timed = []

    def ratio(speedup: float):
        return lambda *args, **kwargs: timed.append(args) or speedup

    monkeypatch.setattr(quantize, "relative_throughput", ratio(1.0))
    slower = quantize.float_head(int8, "auto", (3, SIZE, SIZE), 32)
    assert slower.kept == () and len(slower.candidates) == 2 and slower.speedup == 1.0
    assert int8.read_bytes() == original and len(list(tmp_path.glob("*float-head*"))) == 0
    assert quantize.float_head(int8, "never", (3, SIZE, SIZE), 32).kept == () and len(timed) == 1
    monkeypatch.setattr(quantize, "relative_throughput", ratio(1.3))
    faster = quantize.float_head(int8, "auto", (3, SIZE, SIZE), 32)
    assert faster.kept == faster.candidates and faster.speedup == 1.3 and int8.read_bytes() != original
    props = {p.key: p.value for p in onnx.load(int8).metadata_props}
    assert props["dicomops.float_convolutions"] == ", ".join(sorted(faster.kept))
    assert onnx_export.read_contract(int8).height == SIZE  # still a servable file


def test_held_out_table_is_per_engine_fold_and_vendor() -> None:
    rows = []
    for engine, flip in (("fp32", False), ("int8-qat", True)):
        for fold in (0, 1):
            for i, (label, score) in enumerate([(0, 0.1), (0, 0.4), (1, 0.35), (1, 0.8)]):
                rows.append({"engine": engine, "fold": fold, "vendor": "ge" if i % 2 else "canon", "label": label,
                             "score": 1 - score if flip and fold == 1 else score, "SeriesInstanceUID": f"{fold}{i}"})
    table = qat.held_out_table(rows).set_index("engine")
    # fp32: each fold ranks 3 of 4 pairs right (0.4 > 0.35): AUC 0.75 per fold and pooled.
    assert table.loc["fp32", "mean_fold_auc"] == pytest.approx(0.75)
    assert table.loc["fp32", "pooled_auc"] == pytest.approx(0.75)
    # int8-qat: fold 1 reversed, AUC 0.25 there; the mean over folds is 0.5.
    assert table.loc["int8-qat", "mean_fold_auc"] == pytest.approx(0.5)
    assert set(table.columns) >= {"auc.canon", "auc.ge"}
    assert table.loc["int8-qat", "vs_fp32"] == pytest.approx(-0.25)
    assert (table.loc["fp32", ["vs_fp32", "vs_fp32_low", "vs_fp32_high"]] == 0).all()


def test_bootstrap_aucs_are_paired_and_the_cards_interval_unchanged() -> None:
    from sklearn.metrics import roc_auc_score

    from dicomops.training.metrics import auc_confidence_interval, bootstrap_aucs

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    a = rng.integers(0, 6, 40).astype(float)  # many ties
    b = a + rng.normal(0, 2, 40)
    aucs = bootstrap_aucs(y, [a, a, b], n_boot=500)
    assert np.array_equal(aucs[:, 0], aucs[:, 1])  # one draw for every score: paired
    assert not np.array_equal(aucs[:, 0], aucs[:, 2])
    # Each draw's AUC is scikit-learn's on the series it drew (positives and negatives apart).
    draw = np.random.default_rng(0)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    counts_pos = draw.multinomial(len(pos), np.full(len(pos), 1 / len(pos)), size=500)
    counts_neg = draw.multinomial(len(neg), np.full(len(neg), 1 / len(neg)), size=500)
    for i in (0, 17, 499):
        picked = np.concatenate([np.repeat(pos, counts_pos[i]), np.repeat(neg, counts_neg[i])])
        assert aucs[i, 2] == pytest.approx(roc_auc_score(y[picked], b[picked]), abs=1e-12)
    low, high = np.quantile(bootstrap_aucs(y, [b], n_boot=500)[:, 0], [0.025, 0.975])
    assert auc_confidence_interval(y, b, n_boot=500) == pytest.approx((low, high), abs=1e-9)
    assert np.isnan(bootstrap_aucs(np.ones(5), [a[:5]])).all()  # one class: no AUC


def test_paired_difference_resolves_a_real_loss_and_not_noise() -> None:
    rng = np.random.default_rng(1)
    rows = []
    for fold in range(4):
        labels = rng.integers(0, 2, 30)
        base = labels + rng.normal(0, 0.8, 30)  # AUC about 0.8 per fold
        engines = {"fp32": base, "same": base + rng.normal(0, 1e-3, 30),
                   "worse": np.where(np.arange(30) < 12, rng.normal(0, 1, 30), base)}  # 12 series scrambled
        for engine, scores in engines.items():
            rows += [{"engine": engine, "fold": fold, "vendor": "ge", "label": int(y), "score": float(s),
                      "SeriesInstanceUID": f"{fold}-{i}"} for i, (y, s) in enumerate(zip(labels, scores, strict=True))]
    table = qat.held_out_table(rows).set_index("engine")
    # The point estimate is the difference of the mean fold AUCs.
    assert table.loc["worse", "vs_fp32"] == pytest.approx(
        table.loc["worse", "mean_fold_auc"] - table.loc["fp32", "mean_fold_auc"])
    assert table.loc["worse", "vs_fp32_high"] < 0  # a loss, resolved
    same = table.loc["same"]
    assert same.vs_fp32_low <= 0 <= same.vs_fp32_high and same.vs_fp32_high - same.vs_fp32_low < 0.02


def test_a_teacher_scores_each_row_of_a_student_set_that_takes_some_slabs_more_than_once() -> None:
    from dicomops.training.distill import rows_for

    own = SlabSet(torch.zeros(4, 3, 2, 2).half(), torch.tensor([0, 1, 1, 0]), ["a", "a", "b", "b"],
                  np.array([3, 5, 2, 9]))
    student = own.taken(np.array([0, 1, 1, 1, 2, 3]))  # slab (a, 5) three times, as wall_positive_repeat 3 does
    assert rows_for(student, own) == [0, 1, 1, 1, 2, 3]
    assert rows_for(own, own) == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="slab table changed"):
        rows_for(own.taken(np.array([0, 1, 2])), own)  # the teacher holds a slice the student does not
    with pytest.raises(RuntimeError, match="slab table changed"):
        rows_for(student, own.taken(np.array([0, 1, 2])))
