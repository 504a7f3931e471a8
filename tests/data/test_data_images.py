"""Every image is sized from its header before it is decoded, whatever its format or its field's name, and
a picture that PIL refuses as a decompression bomb is one skipped line in `ann predict --model`."""

import io
import json
import tarfile

import cv2
import numpy as np
import pytest
from PIL import Image

from anncli.data.guards import Limits, header_hw
from anncli.data.images import decode_image, decode_label, read_rgb
from anncli.data.synth import _encode_png
from anncli.errors import UserError
from anncli.data.shards import eval_samples
from conftest import run_ann
from test_data_limits import png_bomb

CAP = Limits(max_pixels=1000)


def _encoded(ext: str, array: np.ndarray) -> bytes:
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else []  # 101: lossless, a few hundred bytes
    ok, data = cv2.imencode(ext, array, params)
    assert ok
    return data.tobytes()


def _shard(path, image: bytes, label: bytes) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in (("s0.img.png", image), ("s0.seg.png", label)):  # whatever the bytes, named .png
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.mark.parametrize("ext", [".webp", ".tiff", ".gif", ".bmp", ".jp2"])
def test_an_image_of_any_format_is_sized_from_its_header_whatever_its_name(tmp_path, ext):
    data = _encoded(ext, np.zeros((40, 50, 3), np.uint8))  # 2,000 pixels, over a cap of 1,000
    assert header_hw(data) == (40, 50)
    assert decode_image(data, Limits()).shape == (40, 50, 3)  # under the default cap it decodes as before
    with pytest.raises(Exception, match=r"image is 40x50 pixels \(HxW\), over data.max_pixels=1000"):
        decode_image(data, CAP)
    grey = io.BytesIO()
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(grey, format=Image.registered_extensions()[ext])
    grey = grey.getvalue()
    with pytest.raises(Exception, match=r"label is 40x50 pixels \(HxW\), over data.max_pixels=1000"):
        decode_label(grey, CAP)
    url = _shard(tmp_path / "x-val-000000.tar", data, _encode_png(np.zeros((40, 50), np.uint8)))
    with pytest.raises(UserError, match=r"x-val-000000.tar: sample s0: image is 40x50 pixels"):
        list(eval_samples([url], rank=0, world_size=1, limits=CAP))


@pytest.mark.parametrize("ext", [".hdr", ".pfm"])
def test_an_image_no_header_reader_can_size_is_refused_before_decoding(tmp_path, ext):
    """cv2 decodes Radiance HDR and PFM, but no header reader of ours sizes them: they are never decoded."""
    data = _encoded(ext, np.zeros((40, 50, 3), np.float32))
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None
    assert header_hw(data) is None
    with pytest.raises(Exception, match=r"image is not a readable image \(\d+ bytes, starts .*; no header gives its size\)"):
        decode_image(data, Limits())
    url = _shard(tmp_path / "x-val-000000.tar", data, _encode_png(np.zeros((40, 50), np.uint8)))
    res = run_ann("data", "inspect", url)
    assert res.returncode == 1 and "img.png is not a readable image" in res.stdout, res.stdout + res.stderr


def _tiny_onnx(path):
    """A real ONNX model as `ann export` writes one, made without torch: a 1x1 conv from RGB to 2 classes."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 3, 1, 1], [1, 0, 0, -1, 0, 0])
    graph = helper.make_graph([helper.make_node("Conv", ["image", "w"], ["logits"])], "tiny",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2, "h", "w"])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    meta = {"dataset": "synth", "classes": ["a", "b"], "palette": [[0, 0, 0], [255, 255, 255]]}
    helper.set_model_props(model, {"anncli": json.dumps(meta)})
    onnx.save(model, str(path))
    return path


def test_a_decompression_bomb_is_one_skipped_line_in_onnx_predict(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    (images / "bomb.png").write_bytes(png_bomb(20000, 20000, depth=1))  # 48 KB, 400 million pixels
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(images / "good.png")
    with pytest.raises(UserError, match=r"bomb.png: cannot read the image: more than [\d,]+ pixels"):
        read_rgb(images / "bomb.png")
    res = run_ann("predict", images, "--model", _tiny_onnx(tmp_path / "m.onnx"), "--out", tmp_path / "o")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    skipped = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(skipped) == 1 and skipped[0].startswith("ann: skipped ") and "bomb.png" in skipped[0], res.stderr
    assert "decompression-bomb limit" in skipped[0] and "1 of 2 image(s) segmented" in res.stdout
    assert (tmp_path / "o" / "good_pred.png").is_file() and not (tmp_path / "o" / "bomb_pred.png").exists()
