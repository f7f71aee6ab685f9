"""End to end through the library API on tiny models built in code."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from conftest import tiny_cnn, tiny_data

from axcnn import rewrite
from axcnn.api import compress
from axcnn.cli import main
from axcnn.config import CompressConfig
from axcnn.errors import AxcnnError

CFG = dict(kmin=2, kmax=10, filter=0.34, min_weights=16, batch_size=32)
REPORT_KEYS = {"schema_version", "model", "settings", "reference_score", "final_score", "accuracy_loss_pp",
               "compression_ratio", "timing", "layers", "file_bytes_before", "file_bytes_after"}
LAYER_KEYS = {"name", "op_type", "shape", "weights", "k", "index_bits", "inertia", "score", "compression_ratio",
              "stored_bytes"}


def _run(session, x, batch=None):
    name = session.get_inputs()[0].name
    if batch:  # a fixed batch dimension: pad the last batch
        pad = np.concatenate([x, np.repeat(x[-1:], (-len(x)) % batch, axis=0)])
        return np.concatenate([session.run(None, {name: pad[i:i + batch]})[0]
                               for i in range(0, len(pad), batch)])[:len(x)]
    return session.run(None, {name: x})[0]


VARIANTS = ["plain", "batch1", "batch3", "constant", "ir3", "opset21", "kl", "top5", "agreement"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_compress_end_to_end(variant, tmp_path):
    kwargs = {"batch": int(variant[-1])} if variant.startswith("batch") else {}
    if variant == "constant":
        kwargs = {"constant_weight": True}
    if variant == "ir3":
        kwargs = {"opset": 8, "ir": 3, "initializers_as_inputs": True}
    if variant == "opset21":
        kwargs = {"opset": 21, "ir": 10}
    model = tiny_cnn(seed=7, **kwargs)
    x, y = tiny_data(model, n=64)
    mp, dp = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(model, mp)
    np.savez(dp, x=x, y=y)
    cfg = dict(CFG)
    if variant in ("kl", "top5", "agreement"):
        cfg.update({"kl": {"estimator": "kl", "calib": 24}, "top5": {"metric": "top5"},
                    "agreement": {"metric": "agreement"}}[variant])
    if variant == "opset21":
        cfg.update(kmin=16, kmax=16)  # 4-bit indices: the native uint4 encoding
    out = tmp_path / "o.onnx"
    result = compress(mp, dp, out, tmp_path / "r.json", CompressConfig(**cfg))
    rep = result.report
    assert REPORT_KEYS <= set(rep) and all(LAYER_KEYS <= set(layer) for layer in rep["layers"])
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(rep))
    assert mp.read_bytes() == model.SerializeToString() or onnx.load(str(mp)) == model  # input untouched

    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    # outputs equal the same model with the clustered weights written densely
    dense = rewrite.replace_weights(model, rewrite.decode(written))
    batch = kwargs.get("batch")
    s_shared = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    s_dense = ort.InferenceSession(dense.SerializeToString(), providers=["CPUExecutionProvider"])
    got, ref = _run(s_shared, x, batch), _run(s_dense, x, batch)
    assert np.max(np.abs(got - ref)) <= 1e-5
    # final_score is what the written model scores, measured here independently
    s_orig = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    orig = _run(s_orig, x, batch)
    labels = orig.argmax(1) if variant == "agreement" else y
    if variant == "top5":
        own = np.mean([lab in np.argsort(-row)[:5] for row, lab in zip(got, labels, strict=True)])
    else:
        own = np.mean(got.argmax(1) == labels)
    assert rep["final_score"] == pytest.approx(own)
    assert rep["accuracy_loss_pp"] == pytest.approx((rep["reference_score"] - rep["final_score"]) * 100)
    # the model describes itself
    meta = {p.key: p.value for p in written.metadata_props}
    stored = json.loads(meta["axcnn.settings"])
    assert "axcnn.version" in meta and stored["kmin"] == cfg["kmin"]
    # what shaped the result, not where this machine keeps its data or how it ran
    assert "data" not in stored and "batch_size" not in stored and None not in stored.values()
    assert rep["settings"]["data"] is not None
    ks = {r["name"]: r["k"] for r in rewrite.shared_layers(written)}
    assert ks == {layer["name"]: layer["k"] for layer in rep["layers"]}
    if variant == "opset21":
        assert {layer["encoding"] for layer in rep["layers"]} == {"uint4"}


def test_report_compression_ratio_is_eq1_over_clustered_weights(tmp_path):
    model = tiny_cnn(seed=2)
    x, y = tiny_data(model)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=x, y=y)
    rep = compress(tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "o.onnx", None, CompressConfig(**CFG)).report
    before = sum(layer["weights"] * 32 for layer in rep["layers"])
    after = sum(layer["weights"] * layer["index_bits"] + layer["k"] * 32 for layer in rep["layers"])
    assert rep["compression_ratio"] == pytest.approx(before / after)
    for layer in rep["layers"]:
        eq1 = layer["weights"] * layer["index_bits"] + layer["k"] * 32
        assert layer["stored_bytes"] <= 1.02 * eq1 / 8 + 16
    assert rep["file_bytes_after"] == (tmp_path / "o.onnx").stat().st_size
    parts = rep["file_breakdown"]
    assert parts["clustered_payload"] + parts["unclustered_tensors"] + parts["graph_and_decode_overhead"] == \
        rep["file_bytes_after"]


def test_failed_decode_check_writes_nothing(tmp_path, monkeypatch):
    model = tiny_cnn()
    x, y = tiny_data(model)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=x, y=y)

    def broken(*a, **k):
        raise AxcnnError("decoded weights of layer w1 differ from the clustered weights")

    monkeypatch.setattr(rewrite, "verify", broken)
    with pytest.raises(AxcnnError, match="differ"):
        compress(tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "o.onnx", tmp_path / "r.json",
                 CompressConfig(**CFG))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "m.onnx"]


def test_written_file_that_does_not_decode_is_removed(tmp_path, monkeypatch):
    """The check runs on the file read back from disk too: a write that corrupts the indices leaves no output."""
    model = tiny_cnn()
    x, y = tiny_data(model)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=x, y=y)
    real_write = rewrite.write_model

    def corrupting_write(m, path, **kw):
        bad = onnx.ModelProto()
        bad.CopyFrom(m)
        q = next(t for t in bad.graph.initializer if t.name.endswith(".q"))
        q.raw_data = bytes(b ^ 0xFF for b in q.raw_data)
        return real_write(bad, path, **kw)

    monkeypatch.setattr(rewrite, "write_model", corrupting_write)
    with pytest.raises(AxcnnError, match="differ|does not decode"):
        compress(tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "o.onnx", tmp_path / "r.json",
                 CompressConfig(**CFG))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "m.onnx"]


def test_limit_scores_a_stratified_subset(tmp_path):
    model = tiny_cnn()
    x, y = tiny_data(model, n=100)
    order = np.argsort(y, kind="stable")  # class-ordered, like the shared CIFAR-10 copy
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=x[order], y=y[order])
    rep = compress(tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "o.onnx", None,
                   CompressConfig(limit=30, **CFG)).report
    assert rep["samples"] == 30


def test_inspect_and_expand_commands(tiny_files, tmp_path):
    mp, dp = tiny_files
    out = tmp_path / "s.onnx"
    compress(mp, dp, out, None, CompressConfig(**CFG))
    r = CliRunner().invoke(main, ["inspect", str(mp)])
    assert r.exit_code == 0 and "w1" in r.output and "bias" in r.output and "axcnn" not in r.output.split("\n")[-1]
    r = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    info = json.loads(r.output)
    assert r.exit_code == 0 and info["shared_model"] and info["compression_ratio"] > 1
    shared = [t for t in info["tensors"] if t["shared"]]
    assert {t["name"] for t in shared} == {"w1", "w2", "w3"} and all(t["k"] >= 2 for t in shared)
    dense = tmp_path / "dense.onnx"
    r = CliRunner().invoke(main, ["expand", str(out), "-o", str(dense)])
    assert r.exit_code == 0, r.output
    plain = onnx.load(str(dense))
    onnx.checker.check_model(plain, full_check=True)
    assert not rewrite.is_shared_model(plain) and not any(n.name.startswith("axcnn/") for n in plain.graph.node)
    x = np.load(dp)["x"]
    a = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    b = ort.InferenceSession(str(dense), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(a, b)
    r = CliRunner().invoke(main, ["expand", str(mp), "-o", str(tmp_path / "e.onnx")])
    assert r.exit_code == 1 and "not an axcnn" in r.output and not (tmp_path / "e.onnx").exists()
    r = CliRunner().invoke(main, ["expand", str(out), "-o", str(out)])
    assert r.exit_code == 1 and "is the input model" in r.output


@pytest.mark.parametrize("kmeans", ["exact", "faiss"])
def test_device_cuda_falls_back_to_cpu(kmeans, tiny_files, tmp_path, caplog):
    """No machine here has a GPU: --device cuda must run the whole job on the CPU and say so."""
    if kmeans == "faiss":
        pytest.importorskip("faiss")
    mp, dp = tiny_files
    with caplog.at_level("INFO", logger="axcnn"):
        rep = compress(mp, dp, tmp_path / "o.onnx", None,
                       CompressConfig(device="cuda", kmeans=kmeans, **CFG)).report
    assert rep["tool"]["providers"] == ["CPUExecutionProvider"]
    assert "falling back to the CPU" in caplog.text
    onnx.checker.check_model(onnx.load(str(tmp_path / "o.onnx")))


# -- granularities and vectors (axcnn.sharing) -------------------------------------------------------------------

SHARINGS = {
    "layer": {},
    "channel1": {"granularity": "channel"},
    "channel3": {"granularity": "channel", "group_size": 3},  # 8 and 10 channels: a smaller last group
    "channel100": {"granularity": "channel", "group_size": 100},  # at least the channel count: one codebook
    "kernel": {"granularity": "kernel"},  # the Gemm falls back to one codebook
    "vector2": {"vector_dim": 2},
}


def _codebook_values(arr: np.ndarray, layer: dict) -> list[int]:
    """Distinct values (pairs for vectors) under each codebook of the written weight, by its own layout."""
    if layer["vector_dim"] == 2:
        moved = np.moveaxis(arr, 1, -1)
        if moved.shape[-1] % 2:
            moved = np.concatenate([moved, moved[..., -1:]], axis=-1)
        return [len(np.unique(moved.reshape(-1, 2), axis=0))]
    if layer["granularity"] == "channel":
        g = layer["group_size"]
        return [len(np.unique(arr[i:i + g])) for i in range(0, arr.shape[0], g)]
    if layer["granularity"] == "kernel":
        return [len(np.unique(arr[o, i])) for o in range(arr.shape[0]) for i in range(arr.shape[1])]
    return [len(np.unique(arr))]


@pytest.mark.parametrize("name", list(SHARINGS))
def test_compress_shares_as_configured(name, tmp_path):
    model = tiny_cnn(seed=5)
    x, y = tiny_data(model, n=64)
    mp, dp, out = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "o.onnx"
    onnx.save(model, mp)
    np.savez(dp, x=x, y=y)
    rep = compress(mp, dp, out, None, CompressConfig(kmin=4, kmax=8, filter=0.5, min_weights=16, batch_size=32,
                                                     **SHARINGS[name])).report
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    decoded = rewrite.decode(written)
    s_shared = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    s_dense = ort.InferenceSession(rewrite.replace_weights(model, decoded).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got = _run(s_shared, x)
    assert np.max(np.abs(got - _run(s_dense, x))) <= 1e-5
    assert rep["final_score"] == pytest.approx(np.mean(got.argmax(1) == y))

    stored = {r["name"]: r for r in rewrite.shared_layers(written)}
    assert set(stored) == {layer["name"] for layer in rep["layers"]} == {"w1", "w2", "w3"}
    want = {"granularity": "layer", "group_size": None, "vector_dim": 1, **SHARINGS[name]}
    for layer in rep["layers"]:
        st = stored[layer["name"]]
        eq1 = rewrite.eq1_bits(st["index_count"], st["k"], 32, codebooks=st["codebooks"], vector_dim=st["vector_dim"])
        assert layer["eq1_bits"] == eq1 and layer["compression_ratio"] == pytest.approx(layer["weights"] * 32 / eq1)
        assert (layer["k"], layer["codebooks"], layer["vector_dim"], layer["granularity"]) == (
            st["k"], st["codebooks"], st["vector_dim"], st["granularity"])
        if layer["granularity"] == "channel":
            assert layer["group_size"] == st["group_size"] == min(want["group_size"] or 1, layer["shape"][0])
        else:
            assert layer["group_size"] is None
        assert max(_codebook_values(decoded[layer["name"]], layer)) <= layer["k"]
        assert layer["stored_bytes"] <= 1.02 * eq1 / 8 + 16
        fell_back = name == "kernel" and layer["name"] == "w3"
        assert (layer["granularity_note"] is not None) == fell_back
        if fell_back:
            assert layer["granularity"] == "layer" and "rank >= 3" in layer["granularity_note"]
        else:
            assert (layer["granularity"], layer["vector_dim"]) == (want["granularity"], want["vector_dim"])
    assert rep["eq1_bits_after"] == sum(layer["eq1_bits"] for layer in rep["layers"])
    assert rep["compression_ratio"] == pytest.approx(rep["eq1_bits_before"] / rep["eq1_bits_after"])
    assert rep["settings"]["granularity"] == want["granularity"]
    if name == "channel100":
        assert {layer["codebooks"] for layer in rep["layers"]} == {1}
    if name == "channel3":
        assert {layer["name"]: layer["codebooks"] for layer in rep["layers"]} == {"w1": 3, "w2": 3, "w3": 4}
    # inspect reads the same from the file
    from axcnn.inspect import describe

    info = {t["name"]: t for t in describe(written)["tensors"] if t.get("shared")}
    assert {n: t["eq1_bits"] for n, t in info.items()} == {la["name"]: la["eq1_bits"] for la in rep["layers"]}


def test_a_kernel_run_skips_a_layer_no_k_makes_smaller_and_says_how_it_was_shared(tmp_path, caplog):
    model = tiny_cnn(seed=5)
    x, y = tiny_data(model, n=64)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=x, y=y)
    # K 9..12 per 3x3 kernel: every kernel keeps its 9 values and its codebooks outweigh the weights
    rep = compress(tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "o.onnx", None,
                   CompressConfig(kmin=9, kmax=12, filter=0.5, min_weights=16, granularity="kernel")).report
    assert [layer["name"] for layer in rep["layers"]] == ["w3"]
    reasons = {s["name"]: s["reason"] for s in rep["skipped"]}
    assert "makes its 72 weights smaller shared as kernel" in reasons["w1"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.startswith("w3: kernel granularity needs a weight of rank >= 3") for m in warned), warned
