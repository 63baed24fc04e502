"""Image / CompressedImage / CameraInfo / PointCloud2 <-> numpy (no cv_bridge): round trips and bad input."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("sensor_msgs.msg", reason="ROS 2 message wheels are not installed (make setup)")

from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from omnistream_perception.image_codec import compressed_to_rgb, image_to_depth, image_to_numpy, image_to_rgb  # noqa: E402
from omnistream_perception.ros.image import (  # noqa: E402
    camera_info_from_intrinsics,
    depth_to_msg,
    intrinsics_from_camera_info,
    numpy_to_image,
    rgb_to_compressed,
    rgb_to_image,
)
from omnistream_perception.ros.pointcloud import pointcloud2_to_xyzrgb, xyzrgb_to_pointcloud2  # noqa: E402

RNG = np.random.default_rng(0)


def _rgb(h=6, w=9):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8"])
def test_colour_round_trip(encoding):
    rgb = _rgb()
    msg = rgb_to_image(rgb, encoding=encoding)
    assert msg.encoding == encoding and msg.step == 9 * 3 and len(msg.data) == 6 * 9 * 3
    np.testing.assert_array_equal(image_to_rgb(msg), rgb)
    if encoding == "bgr8":  # the bytes really are in BGR order
        np.testing.assert_array_equal(image_to_numpy(msg)[..., 0], rgb[..., 2])


def test_mono_rgba_and_float_intensity_become_rgb():
    grey = RNG.integers(0, 256, (4, 5), dtype=np.uint8)
    out = image_to_rgb(numpy_to_image(grey, "mono8"))
    assert out.shape == (4, 5, 3) and (out == grey[..., None]).all()
    rgba = RNG.integers(0, 256, (4, 5, 4), dtype=np.uint8)
    np.testing.assert_array_equal(image_to_rgb(numpy_to_image(rgba, "bgra8")), rgba[..., 2::-1])
    intensity = np.array([[0.0, 0.5, 1.0, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(image_to_rgb(numpy_to_image(intensity, "32FC1"))[0, :, 0], [0, 128, 255, 255])


def test_row_padding_is_removed():
    rgb = _rgb(3, 4)
    padded = np.zeros((3, 4 * 3 + 5), np.uint8)
    padded[:, :12] = rgb.reshape(3, 12)
    msg = Image(height=3, width=4, encoding="rgb8", step=17, data=padded.tobytes())
    np.testing.assert_array_equal(image_to_rgb(msg), rgb)


def test_depth_round_trip_and_16uc1_millimetres_and_big_endian():
    depth = RNG.uniform(0.1, 5.0, (5, 7)).astype(np.float32)
    msg = depth_to_msg(depth)
    assert msg.encoding == "32FC1" and msg.step == 7 * 4
    np.testing.assert_array_equal(image_to_depth(msg), depth)
    mm = np.array([[1000, 2500]], dtype=np.uint16)
    np.testing.assert_allclose(image_to_depth(numpy_to_image(mm, "16UC1")), [[1.0, 2.5]])
    big = Image(height=5, width=7, encoding="32FC1", is_bigendian=1, step=28, data=depth.astype(">f4").tobytes())
    np.testing.assert_array_equal(image_to_depth(big), depth)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_compressed_round_trip(fmt):
    rgb = np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (16, 1, 3))  # smooth: jpeg stays close
    out = compressed_to_rgb(rgb_to_compressed(rgb, fmt=fmt))
    assert out.shape == rgb.shape and out.dtype == np.uint8
    tolerance = 0 if fmt == "png" else 8
    assert np.abs(out.astype(int) - rgb.astype(int)).max() <= tolerance


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (Image(height=2, width=2, encoding="yuv422_weird", step=4, data=bytes(8)), "unsupported image encoding"),
        (Image(height=2, width=2, encoding="rgb8", step=6, data=bytes(11)), "does not match step x height"),
        (Image(height=2, width=2, encoding="rgb8", step=5, data=bytes(10)), "step 5 is smaller"),
        (Image(height=0, width=0, encoding="rgb8", step=0, data=b""), "zero-size"),
        (Image(height=1, width=2, encoding="32FC1", step=8, data=np.array([1, np.nan], "<f4").tobytes()), "NaN"),
    ],
    ids=["encoding", "length", "step", "zero-size", "nan"],
)
def test_bad_images_raise_clear_errors(msg, match):
    with pytest.raises(ValueError, match=match):
        image_to_rgb(msg)


def test_bad_compressed_raise_clear_errors():
    with pytest.raises(ValueError, match="corrupt compressed image"):
        compressed_to_rgb(CompressedImage(format="jpeg", data=b"\xff\xd8 definitely not a jpeg"))
    with pytest.raises(ValueError, match="zero-size"):
        compressed_to_rgb(CompressedImage(format="png", data=b""))
    with pytest.raises(ValueError, match="unsupported compressed format"):
        compressed_to_rgb(CompressedImage(format="tiff", data=b"II*\x00"))


def test_depth_reader_refuses_colour_and_writer_checks_dtype():
    with pytest.raises(ValueError, match="expected a depth image"):
        image_to_depth(rgb_to_image(_rgb()))
    with pytest.raises(ValueError, match="needs dtype uint8"):
        numpy_to_image(np.zeros((2, 2, 3), np.float32), "rgb8")


def test_camera_info_round_trip():
    k = np.array([[500.0, 0, 320], [0, 510.0, 240], [0, 0, 1]])
    info = camera_info_from_intrinsics(k, 640, 480)
    assert (info.width, info.height) == (640, 480)
    np.testing.assert_array_equal(intrinsics_from_camera_info(info), k)
    assert list(info.p) == [500.0, 0, 320, 0, 0, 510.0, 240, 0, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="no valid intrinsics"):
        intrinsics_from_camera_info(type(info)())


def test_pointcloud_packs_xyz_and_rgb_and_drops_nan():
    points = RNG.normal(size=(20, 3)).astype(np.float32)
    points[5] = np.nan
    colors = RNG.integers(0, 256, (20, 3), dtype=np.uint8)
    msg = xyzrgb_to_pointcloud2(points, colors)
    assert [f.name for f in msg.fields] == ["x", "y", "z", "rgb"] and msg.point_step == 16 and msg.width == 19
    back, back_colors = pointcloud2_to_xyzrgb(msg)
    keep = np.arange(20) != 5
    np.testing.assert_array_equal(back, points[keep])
    np.testing.assert_array_equal(back_colors, colors[keep])
    # rgb is the PCL packing 0x00RRGGBB in the bits of a float32
    rgb_bits = np.frombuffer(bytes(msg.data), np.uint32).reshape(-1, 4)[0, 3]
    assert rgb_bits == (int(colors[0, 0]) << 16) | (int(colors[0, 1]) << 8) | int(colors[0, 2])


@pytest.mark.realtime  # times the conversion: assigning a numpy array instead of bytes took 144 ms
def test_writing_720p_uses_the_fast_bytes_path():
    rgb = np.zeros((720, 1280, 3), np.uint8)
    start = time.perf_counter()
    msg = rgb_to_image(rgb)
    elapsed = time.perf_counter() - start
    assert len(msg.data) == 720 * 1280 * 3
    # assigning the numpy array element-wise takes > 100 ms; bytes take ~1 ms (generous bound for busy CI)
    assert elapsed < 0.08, f"rgb_to_image took {elapsed * 1e3:.1f} ms"


def test_absurd_images_are_refused_from_their_header_before_decoding():
    import io

    from PIL import Image as PILImage

    from omnistream_perception.image_codec import check_pixel_count

    # a raw image that declares 100000x100000 pixels: refused before its (here absent) data is looked at
    huge = Image(height=100_000, width=100_000, encoding="rgb8", step=300_000, data=b"")
    with pytest.raises(ValueError, match="MP refused"):
        image_to_rgb(huge, max_pixels=36_000_000)
    # a 9000x9000 all-black PNG is tiny compressed (decoding it would take 243 MB and seconds)
    buffer = io.BytesIO()
    PILImage.new("L", (9000, 9000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 200_000
    msg = CompressedImage(format="png", data=buffer.getvalue())
    with pytest.raises(ValueError, match="9000x9000 = 81.0 MP refused"):
        compressed_to_rgb(msg, max_pixels=36_000_000)
    # below the limit, the same paths decode as before
    small = rgb_to_compressed(RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8), fmt="png")
    assert compressed_to_rgb(small, max_pixels=24 * 32).shape == (24, 32, 3)
    with pytest.raises(ValueError, match="max_input_pixels"):
        compressed_to_rgb(small, max_pixels=24 * 32 - 1)
    check_pixel_count(10**6, 10**6, None)  # None: no limit
