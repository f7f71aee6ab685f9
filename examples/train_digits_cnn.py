#!/usr/bin/env python
"""Train a small CNN on scikit-learn's bundled digits in plain numpy and export it to ONNX.

The model (NCHW float32 input ``x / 16``)::

    Conv(1->8, 3x3, pad 1) + ReLU -> Conv(8->16, 3x3, pad 1) + ReLU -> MaxPool 2x2
    -> Flatten (256) -> Gemm 256->64 + ReLU -> Gemm 64->10 (logits)

Writes ``digits_cnn.onnx`` and ``digits_test.npz`` (the held-out 30%: ``x`` uint8 NHWC [n,8,8,1] raw
0..16 values, ``y`` int64) into ``--out``. Use ``--scale 16`` with axcnn (layout NCHW is inferred).
Deterministic: the same seed gives the same files (on the same machine and numpy/BLAS build).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import zipfile
from pathlib import Path

# The matrices here are tiny: one BLAS thread is as fast as several and does not slow to a crawl when the
# CPUs are busy with other work (multi-threaded OpenBLAS spin-waits). Set before numpy is imported;
# an explicit setting in the environment wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------ data


def load_split(seed: int, test_fraction: float = 0.3):
    """Digits as uint8 images [N,8,8] (0..16) and int64 labels, split 70/30 stratified by class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)  # values are whole numbers 0..16
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(members[: int(round(test_fraction * len(members)))])
    test = np.zeros(len(labels), dtype=bool)
    test[np.concatenate(test_idx)] = True
    return images[~test], labels[~test], images[test], labels[test]


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N,8,8] -> the model input: float32 NCHW [N,1,8,8] divided by 16."""
    return (images.astype(np.float32) / np.float32(16.0))[:, np.newaxis, :, :]


# ------------------------------------------------------------------------------------- numpy CNN layers


def im2col(x: np.ndarray) -> np.ndarray:
    """3x3, pad 1, stride 1 patches of NCHW ``x``: [N*H*W, C*9] (rows in n,h,w order; cols in c,kh,kw)."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # [N,C,H,W,3,3]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * 9)


def col2im(dcols: np.ndarray, shape: tuple[int, int, int, int]) -> np.ndarray:
    """Adjoint of :func:`im2col`: scatter-add patch gradients back to an NCHW gradient."""
    n, c, h, w = shape
    d = dcols.reshape(n, h, w, c, 3, 3)
    dxp = np.zeros((n, c, h + 2, w + 2), dtype=dcols.dtype)
    for i in range(3):
        for j in range(3):
            dxp[:, :, i : i + h, j : j + w] += d[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return dxp[:, :, 1:-1, 1:-1]


def conv_forward(x, weight, bias):
    n, _, h, w = x.shape
    cols = im2col(x)
    out = cols @ weight.reshape(weight.shape[0], -1).T + bias  # [N*H*W, Cout]
    return out.reshape(n, h, w, -1).transpose(0, 3, 1, 2), cols


def conv_backward(dout, cols, x_shape, weight):
    cout = weight.shape[0]
    d = dout.transpose(0, 2, 3, 1).reshape(-1, cout)  # [N*H*W, Cout]
    dweight = (d.T @ cols).reshape(weight.shape)
    dbias = d.sum(axis=0)
    dx = col2im(d @ weight.reshape(cout, -1), x_shape)
    return dx, dweight, dbias


def maxpool_forward(x):
    n, c, h, w = x.shape
    win = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    arg = win.argmax(axis=-1)
    return np.take_along_axis(win, arg[..., None], axis=-1)[..., 0], arg


def maxpool_backward(dout, arg, x_shape):
    n, c, h, w = x_shape
    dwin = np.zeros((n, c, h // 2, w // 2, 4), dtype=dout.dtype)
    np.put_along_axis(dwin, arg[..., None], dout[..., None], axis=-1)
    return dwin.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(x_shape)


def init_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def he(shape, fan_in):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return {
        "conv1.weight": he((8, 1, 3, 3), 9),
        "conv1.bias": np.zeros(8, np.float32),
        "conv2.weight": he((16, 8, 3, 3), 72),
        "conv2.bias": np.zeros(16, np.float32),
        "fc1.weight": he((64, 256), 256),  # Gemm transB=1 layout: [out, in]
        "fc1.bias": np.zeros(64, np.float32),
        "fc2.weight": he((10, 64), 64),
        "fc2.bias": np.zeros(10, np.float32),
    }


def forward(p: dict[str, np.ndarray], x: np.ndarray, cache: dict | None = None) -> np.ndarray:
    """Logits [N,10] for NCHW input ``x``; fills ``cache`` for :func:`backward` when given."""
    z1, cols1 = conv_forward(x, p["conv1.weight"], p["conv1.bias"])
    a1 = np.maximum(z1, 0)
    z2, cols2 = conv_forward(a1, p["conv2.weight"], p["conv2.bias"])
    a2 = np.maximum(z2, 0)
    pooled, arg = maxpool_forward(a2)
    flat = pooled.reshape(len(x), -1)  # C,H,W order, as ONNX Flatten on NCHW
    z3 = flat @ p["fc1.weight"].T + p["fc1.bias"]
    a3 = np.maximum(z3, 0)
    logits = a3 @ p["fc2.weight"].T + p["fc2.bias"]
    if cache is not None:
        cache.update(
            x=x, cols1=cols1, z1=z1, a1=a1, cols2=cols2, z2=z2, a2=a2, arg=arg, pooled=pooled, flat=flat, z3=z3, a3=a3
        )
    return logits


def backward(p, cache, dlogits):
    g = {}
    c = cache
    g["fc2.weight"] = dlogits.T @ c["a3"]
    g["fc2.bias"] = dlogits.sum(axis=0)
    dz3 = (dlogits @ p["fc2.weight"]) * (c["z3"] > 0)
    g["fc1.weight"] = dz3.T @ c["flat"]
    g["fc1.bias"] = dz3.sum(axis=0)
    dpooled = (dz3 @ p["fc1.weight"]).reshape(c["pooled"].shape)
    dz2 = maxpool_backward(dpooled, c["arg"], c["a2"].shape) * (c["z2"] > 0)
    da1, g["conv2.weight"], g["conv2.bias"] = conv_backward(dz2, c["cols2"], c["a1"].shape, p["conv2.weight"])
    dz1 = da1 * (c["z1"] > 0)
    _, g["conv1.weight"], g["conv1.bias"] = conv_backward(dz1, c["cols1"], c["x"].shape, p["conv1.weight"])
    return g


def softmax_xent(logits: np.ndarray, y: np.ndarray):
    """Mean cross-entropy and its gradient w.r.t. the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    prob = e / e.sum(axis=1, keepdims=True)
    n = len(y)
    loss = -np.log(prob[np.arange(n), y] + 1e-12).mean()
    d = prob
    d[np.arange(n), y] -= 1
    return float(loss), (d / n).astype(np.float32)


def train(x, y, *, seed: int, epochs: int, batch: int, lr: float, weight_decay: float, verbose: bool):
    rng = np.random.default_rng(seed)
    p = init_params(rng)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(w) for k, w in p.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    step = 0
    for epoch in range(epochs):
        lr_t = lr * 0.5 * (1 + np.cos(np.pi * epoch / epochs))  # cosine decay per epoch
        order = rng.permutation(len(x))
        total = 0.0
        for s in range(0, len(x), batch):
            idx = order[s : s + batch]
            cache: dict = {}
            loss, dlogits = softmax_xent(forward(p, x[idx], cache), y[idx])
            total += loss * len(idx)
            grads = backward(p, cache, dlogits)
            step += 1
            for k in p:
                gk = grads[k] + weight_decay * p[k] if k.endswith("weight") else grads[k]
                m[k] = b1 * m[k] + (1 - b1) * gk
                v[k] = b2 * v[k] + (1 - b2) * gk * gk
                mhat = m[k] / (1 - b1**step)
                vhat = v[k] / (1 - b2**step)
                p[k] = (p[k] - lr_t * mhat / (np.sqrt(vhat) + eps)).astype(np.float32)
        if verbose:
            print(f"epoch {epoch + 1:2d}/{epochs}  loss {total / len(x):.4f}")
    return p


# ---------------------------------------------------------------------------------------------- export


def build_onnx(p: dict[str, np.ndarray]):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node(
            "Conv",
            ["input", "conv1.weight", "conv1.bias"],
            ["conv1"],
            name="conv1",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            strides=[1, 1],
        ),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node(
            "Conv",
            ["relu1", "conv2.weight", "conv2.bias"],
            ["conv2"],
            name="conv2",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            strides=[1, 1],
        ),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("MaxPool", ["relu2"], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["flatten"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flatten", "fc1.weight", "fc1.bias"], ["fc1"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1"], ["relu3"], name="relu3"),
        helper.make_node("Gemm", ["relu3", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(w, np.float32), name=k) for k, w in p.items()],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 13)],
        producer_name="axcnn-examples",
        doc_string="Small CNN on sklearn digits; input = raw pixel values (0..16) / 16, NCHW.",
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def ort_logits(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def save_npz_deterministic(path: Path, **arrays: np.ndarray) -> None:
    """Like ``np.savez`` but with fixed zip timestamps, so the same arrays give the same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE, help="output directory (default: this script's folder)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the split, the init and the batches")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (cosine-decayed)")
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--quiet", action="store_true", help="no per-epoch loss")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    tr_img, tr_y, te_img, te_y = load_split(args.seed)
    x_tr, x_te = to_input(tr_img), to_input(te_img)
    print(f"digits: {len(tr_y)} train / {len(te_y)} test samples")
    params = train(
        x_tr,
        tr_y,
        seed=args.seed,
        epochs=args.epochs,
        batch=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        verbose=not args.quiet,
    )
    train_s = time.perf_counter() - t0

    pred_np = forward(params, x_te).argmax(axis=1)
    train_acc = float((forward(params, x_tr).argmax(axis=1) == tr_y).mean())

    model = build_onnx(params)
    model_bytes = model.SerializeToString()
    logits_ort = ort_logits(model_bytes, x_te)
    pred_ort = logits_ort.argmax(axis=1)
    if not np.array_equal(pred_ort, pred_np):
        print(
            f"error: onnxruntime top-1 differs from numpy on {int((pred_ort != pred_np).sum())} samples",
            file=sys.stderr,
        )
        return 1
    acc_ort = float((pred_ort == te_y).mean())

    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / "digits_cnn.onnx"
    npz_path = args.out / "digits_test.npz"
    tmp = onnx_path.with_suffix(".onnx.tmp")
    tmp.write_bytes(model_bytes)
    os.replace(tmp, onnx_path)
    save_npz_deterministic(npz_path, x=te_img[..., np.newaxis], y=te_y)

    print(f"train accuracy {train_acc:.4f}; training took {train_s:.1f} s")
    print(f"test accuracy {acc_ort:.4f} ({int((pred_ort == te_y).sum())}/{len(te_y)}), numpy and onnxruntime agree")
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes) and {npz_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
