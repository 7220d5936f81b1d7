"""preprocess.py: buckets, image reading, bad inputs, incremental runs, manifest checks, end to end."""
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import images
import preprocess as P
from config import ConfigError, get_config
from conftest import ROOT
from tiny_models import make_image, make_image_folder, save_tiny_t5, save_tiny_t5gemma2, save_tiny_vae


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("t5"))
    save_tiny_t5(path)
    return path


def pixel_cfg(tmp_path, t5_dir, **kw):
    """Pixel space, 32 px buckets (3 of them), the tiny T5 encoder: fast."""
    settings = dict(data_source="folder", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"),
                    target_resolution=32, bucket_align=8, text_encoder=t5_dir, text_dim=32,
                    max_token_length=8, preprocess_batch_size=3)
    return get_config("tiny", **{**settings, **kw})


def record_encoded(monkeypatch) -> list:
    """A list that collects every source preprocess encodes from now on."""
    encoded, real = [], P.encode_files

    def spy(cfg, todo, *a, **k):
        encoded.extend(todo)
        return real(cfg, todo, *a, **k)

    monkeypatch.setattr(P, "encode_files", spy)
    return encoded


# --- buckets -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target,align,ratio", [(32, 8, 2.0), (448, 32, 2.0), (512, 64, 2.0), (1024, 64, 4.0),
                                                (256, 16, 1.5)])
def test_buckets_keep_area_alignment_and_aspect_limits(target, align, ratio):
    buckets = images.make_buckets(target, align, ratio)
    assert len(buckets) == len(set(buckets)) >= 1
    side = round(target / align) * align
    assert (side, side) in buckets
    for w, h in buckets:
        assert w % align == 0 and h % align == 0
        assert max(w / h, h / w) <= ratio + 1e-9
        assert abs(w * h - target ** 2) <= max(w, h) * align / 2  # the nearest height for this width
        assert (h, w) in buckets  # both orientations
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)
    if align <= target / 8:  # fine alignment: the extremes reach close to the limit
        assert max(ratios) > ratio * 0.8


@pytest.mark.parametrize("target,align,ratio,side", [(20, 8, 1.0, 16), (12, 8, 1.4, 8), (28, 8, 1.0, 24),
                                                     (100, 64, 1.0, 64)])
def test_buckets_of_a_target_between_aligned_squares_are_the_nearest_square(target, align, ratio, side):
    # each width's nearest-area height is beyond max_aspect_ratio: no bucket at all made preprocess skip every
    # image as "unreadable" (bucket_for: max() of an empty sequence)
    buckets = images.make_buckets(target, align, ratio)
    assert buckets == [(side, side)]
    assert images.bucket_for(30, 20, buckets) == (side, side)


def test_bucket_for_picks_the_nearest_log_aspect_ratio():
    buckets = images.make_buckets(448, 32, 2.0)
    assert images.bucket_for(1000, 1000, buckets) == (448, 448)
    assert images.bucket_for(4000, 1000, buckets) == (640, 320)  # beyond the limit: the widest bucket
    assert images.bucket_for(1000, 4000, buckets) == (320, 640)
    for w, h in [(1200, 800), (600, 1000), (513, 512), (1920, 1080)]:
        best = images.bucket_for(w, h, buckets)
        err = abs(math.log(best[0] / best[1]) - math.log(w / h))
        assert all(err <= abs(math.log(b[0] / b[1]) - math.log(w / h)) + 1e-12 for b in buckets)
    assert images.bucket_for(40, 24, images.make_buckets(32, 8, 2.0)) == (40, 24)


def test_resize_and_crop_covers_and_centres():
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 0, 255), (100, 0, 200, 100))  # blue middle third
    out = images.resize_and_crop(img, (64, 64))
    assert out.size == (64, 64)
    assert np.asarray(out)[32, 32].tolist() == [0, 0, 255]  # the centre is kept
    for size, target in [((50, 80), (24, 40)), ((33, 17), (40, 24)), ((640, 480), (32, 32)), ((8, 8), (16, 16))]:
        assert images.resize_and_crop(Image.new("RGB", size), target).size == target


def test_area_kept_and_a_warning_for_images_cropped_hard(tmp_path, t5_dir, capsys):
    assert images.area_kept(300, 100, (64, 64)) == pytest.approx(1 / 3)  # the middle third of a 3:1 image
    assert images.area_kept(100, 300, (32, 64)) == pytest.approx(2 / 3)
    assert images.area_kept(640, 480, (40, 30)) == 1.0
    cfg = pixel_cfg(tmp_path, t5_dir)  # buckets 24x40, 32x32, 40x24
    make_image_folder(str(tmp_path / "data"), [(32, 32), (80, 48), (160, 32), (200, 40)])  # two are 5:1
    manifest = P.ensure_cache(cfg)
    kept = {s: e["area_kept"] for s, e in manifest["entries"].items()}
    assert kept["img_000.png"] == kept["img_001.png"] == 1.0
    assert kept["img_002.png"] == kept["img_003.png"] == pytest.approx(1 / 3, abs=1e-3)  # 5:3 of 5:1
    warning = [line for line in capsys.readouterr().err.splitlines() if "centre crop" in line]
    assert len(warning) == 1 and "2 image(s)" in warning[0] and "33% kept" in warning[0]
    assert "img_002.png" in warning[0] and "max_aspect_ratio=2" in warning[0]
    P.ensure_cache(cfg)  # said once, when encoded
    assert "centre crop" not in capsys.readouterr().err


def test_runs_and_cache_inside_the_data_folder_are_not_data(tmp_path, t5_dir, capsys):
    """out_dir and cache_dir inside data_dir: the runs' sample grids are no training images (each was a
    'missing caption' warning)."""
    inside = tmp_path / "data"
    cfg = pixel_cfg(tmp_path, t5_dir, cache_dir=str(inside / "cache"), out_dir=str(inside / "runs"))
    make_image_folder(cfg.data_dir, [(32, 32), (40, 24)])
    os.makedirs(os.path.join(cfg.out_dir, "x", "samples"))
    make_image(32, 32).save(os.path.join(cfg.out_dir, "x", "samples", "step_0000100.png"))
    assert sorted(P.ensure_cache(cfg)["entries"]) == ["img_000.png", "img_001.png"]
    assert "warning" not in capsys.readouterr().err


# --- reading images --------------------------------------------------------------------------------------

def save_and_load(img, tmp_path, name="x.png", **save_kw):
    path = str(tmp_path / name)
    img.save(path, **save_kw)
    out = images.load_image(path)
    assert out.mode == "RGB"
    return np.asarray(out)


def swapped_primaries_profile() -> bytes:
    """An ICC profile that is sRGB with its red and green primaries swapped (named so): a colour space in which
    (200, 30, 30) is sRGB's (30, 200, 30), as a Display P3 or Adobe RGB photo differs from sRGB, only more."""
    import struct
    from PIL import ImageCms
    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    table = {bytes(icc[132 + 12 * i:136 + 12 * i]): 132 + 12 * i for i in range(struct.unpack(">I", icc[128:132])[0])}
    r, g = table[b"rXYZ"] + 4, table[b"gXYZ"] + 4  # where each tag's offset is: point each at the other's data
    icc[r:r + 4], icc[g:g + 4] = icc[g:g + 4], icc[r:r + 4]
    return bytes(icc).replace("sRGB".encode("utf-16-be"), "swap".encode("utf-16-be"))


def test_colour_profiles_are_converted_to_srgb(tmp_path):
    """A photo with a colour profile (a phone's Display P3) is converted to sRGB, as a browser shows it; one
    with an sRGB profile or a damaged profile is read as it is (all three were read as sRGB)."""
    from PIL import ImageCms
    red = Image.new("RGB", (8, 8), (200, 30, 30))
    swapped = save_and_load(red, tmp_path, "p3.png", icc_profile=swapped_primaries_profile())[0, 0]
    assert swapped[1] > 150 and swapped[0] < 80, swapped  # green in sRGB
    with_alpha = Image.new("RGBA", (8, 8), (200, 30, 30, 255))
    assert save_and_load(with_alpha, tmp_path, "p3a.png", icc_profile=swapped_primaries_profile())[0, 0][1] > 150
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert save_and_load(red, tmp_path, "srgb.png", icc_profile=srgb)[0, 0].tolist() == [200, 30, 30]
    assert save_and_load(red, tmp_path, "bad.png", icc_profile=b"not a profile")[0, 0].tolist() == [200, 30, 30]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    a = save_and_load(img, tmp_path, "rot.jpg", exif=exif, quality=95)
    assert a.shape == (40, 20, 3)  # portrait after transposing
    assert a[2, 10, 0] > 200 and a[2, 10, 2] < 60  # red is now at the top


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    a = save_and_load(rgba, tmp_path, "rgba.png")
    assert a[4, 4].tolist() == [255, 255, 255] and a[0, 0].tolist() == [255, 0, 0]
    la = Image.new("LA", (8, 8), (0, 0))
    assert save_and_load(la, tmp_path, "la.png")[0, 0].tolist() == [255, 255, 255]
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    a = save_and_load(pal, tmp_path, "pal.png", transparency=0)
    assert a[0, 0].tolist() == [255, 255, 255] and a[4, 4].tolist() == [0, 255, 0]


def test_gray_palette_cmyk_16bit_and_1bit_become_rgb(tmp_path):
    assert save_and_load(Image.new("L", (4, 4), 77), tmp_path, "l.png")[0, 0].tolist() == [77] * 3
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30] + [0] * 765)
    assert save_and_load(pal, tmp_path, "p.png")[0, 0].tolist() == [10, 20, 30]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    assert save_and_load(cmyk, tmp_path, "c.jpg", quality=100)[1, 1].tolist()[0] > 240
    sixteen = Image.fromarray(np.array([[65535, 32896], [0, 257]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    a = save_and_load(sixteen, tmp_path, "16.png")
    assert a[..., 0].tolist() == [[255, 128], [0, 1]]
    assert save_and_load(Image.new("1", (4, 4), 1), tmp_path, "1.png")[0, 0].tolist() == [255] * 3
    holes = np.full((4, 4), 0.5, dtype=np.float32)
    holes[0, 0] = np.nan  # a float TIFF with a hole: black there, no numpy warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert save_and_load(Image.fromarray(holes, "F"), tmp_path, "f.tif")[:, 0, 0].tolist() == [0, 128, 128, 128]
    frames = [Image.new("RGB", (4, 4), c) for c in ("red", "blue")]  # an animated GIF: its first frame
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert np.asarray(images.load_image(str(tmp_path / "a.gif")))[0, 0].tolist() == [255, 0, 0]
    for name in ("f.tiff", "f.bmp", "f.avif"):
        assert save_and_load(Image.new("RGBA", (4, 4), (0, 0, 255, 255)), tmp_path, name)[0, 0, 2] > 240


def test_big_jpegs_decode_at_a_reduced_scale_with_the_same_result(tmp_path):
    smooth = np.asarray(make_image(80, 60).resize((1600, 1200), Image.BICUBIC))
    rotated = Image.fromarray(smooth)
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    rotated.save(tmp_path / "r.jpg", exif=exif, quality=95)
    Image.fromarray(smooth).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    Image.fromarray(smooth).save(tmp_path / "p.png")
    for name, full_size in [("r.jpg", (1200, 1600)), ("c.jpg", (1600, 1200)), ("p.png", (1600, 1200))]:
        full = images.load_image(str(tmp_path / name))
        fast = images.load_image(str(tmp_path / name), min_side=256)
        assert full.size == full_size and fast.mode == "RGB"
        if name.endswith(".jpg"):  # 1/4 scale: the smallest with both sides >= 256
            assert fast.size == (full_size[0] // 4, full_size[1] // 4)
        else:
            assert fast.size == full_size  # only JPEGs have reduced-scale decoding
        a = np.asarray(images.resize_and_crop(full, (96, 128)), dtype=float)
        b = np.asarray(images.resize_and_crop(fast, (96, 128)), dtype=float)
        assert np.abs(a - b).mean() < 1.0 and np.abs(a - b).max() <= 6


def test_jpegs_past_the_decompression_bomb_limit_and_phone_mpo_jpegs_decode_at_a_reduced_scale(tmp_path,
                                                                                            monkeypatch):
    """A 190 MP panorama JPEG decodes at 1/8 scale (was skipped as a decompression bomb); other formats that
    big are still skipped. A phone's MPO JPEG (a depth or gain map after the photo) decodes reduced too."""
    smooth = Image.fromarray(np.asarray(make_image(80, 60).resize((400, 300), Image.BICUBIC)))
    smooth.save(tmp_path / "pano.jpg", quality=95)
    smooth.save(tmp_path / "pano.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400 * 300 // 3)  # both are past 2x Pillow's limit now
    assert images.load_image(str(tmp_path / "pano.jpg"), min_side=32).size == (50, 38)
    for name, min_side in [("pano.jpg", 0), ("pano.png", 32)]:
        with pytest.raises(images.Skip, match="DecompressionBombError"):
            images.load_image(str(tmp_path / name), min_side=min_side)
    monkeypatch.undo()
    smooth.save(tmp_path / "phone.jpg", save_all=True, append_images=[smooth.convert("L")], format="MPO")
    assert Image.open(tmp_path / "phone.jpg").format == "MPO"
    assert images.load_image(str(tmp_path / "phone.jpg"), min_side=64).size == (100, 75)


def test_captions_from_a_hugging_face_metadata_file(tmp_path, t5_dir, monkeypatch):
    """imagefolder layout: metadata.jsonl (or .csv) with file_name + text/caption/prompt, relative to its
    folder; a .txt beside an image wins; editing one row re-encodes that image only."""
    cfg = pixel_cfg(tmp_path, t5_dir)
    data = tmp_path / "data"
    os.makedirs(data / "train" / "more")
    for name in ["train/a.png", "train/b.png", "train/more/c.png", "train/d.png", "train/e.png", "f.png"]:
        make_image(32, 32).save(data / name)
    rows = [{"file_name": "a.png", "text": "a red square"}, {"file_name": "more/c.png", "caption": "a  blue circle"},
            {"file_name": "b.png", "text": "ignored: b.txt wins"}, {"file_name": "d.png", "text": "  "}]
    lines = [json.dumps(r) for r in rows] + ["{not json", json.dumps(["not", "a", "row"])]
    (data / "train" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (data / "train" / "b.txt").write_text("a green star")
    (data / "metadata.csv").write_text("file_name,prompt\nf.png,a yellow triangle\n")
    (tmp_path / "metadata.csv").write_text("file_name,text\ndata/train/e.png,above the data folder: not used\n")
    manifest = P.ensure_cache(cfg)
    captions = {s: torch.load(os.path.join(cfg.cache_dir, e["file"]), weights_only=True)["caption"]
                for s, e in manifest["entries"].items()}
    assert captions == {"train/a.png": "a red square", "train/b.png": "a green star",
                        "train/more/c.png": "a blue circle", "f.png": "a yellow triangle"}
    assert manifest["skipped"]["train/d.png"]["reason"] == "empty caption"
    assert manifest["skipped"]["train/e.png"]["reason"] == "missing caption"
    encoded = record_encoded(monkeypatch)
    rows[0]["text"] = "a large red square"
    (data / "train" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    again = P.ensure_cache(cfg)
    assert encoded == ["train/a.png"]
    assert torch.load(os.path.join(cfg.cache_dir, again["entries"]["train/a.png"]["file"]),
                      weights_only=True)["caption"] == "a large red square"


def test_find_images_follows_linked_folders_once_and_names_unlistable_ones(tmp_path, monkeypatch, capsys):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    os.makedirs(data / "sub")
    os.makedirs(elsewhere)
    for folder, name in [(data, "a.png"), (data / "sub", "b.JPG"), (elsewhere, "c.webp"), (data, "d.tiff"),
                         (data, "e.bmp"), (data, "f.gif")]:
        make_image(8, 8).save(folder / name)
    (data / "sub" / "notes.txt").write_text("not an image")
    os.symlink(data, data / "sub" / "back_up")       # a loop
    os.symlink(elsewhere, data / "linked")           # a linked folder of more images
    os.symlink(elsewhere, data / "sub" / "again")    # the same folder through a second link
    os.makedirs(data / ".hidden")
    make_image(8, 8).save(data / ".hidden" / "d.png")
    for name in ("IMG_0001.HEIC", "sub/IMG_0002.heic", "sub/raw.dng"):  # formats it does not read: named
        (data / name).write_bytes(b"not read")
    assert images.find_images(str(data)) == ["a.png", "d.tiff", "e.bmp", "f.gif", "linked/c.webp", "sub/b.JPG"]
    assert capsys.readouterr().err.splitlines() == [
        f"warning: data_dir={data}: 3 image(s) in a format preprocess does not read are left out (.dng, .heic; "
        "e.g. IMG_0001.HEIC): convert them to png, jpg or webp"]
    assert images.find_images(str(data), skip_dirs=[str(data / "sub"), str(data / "no_such")]) == \
        ["a.png", "d.tiff", "e.bmp", "f.gif", "linked/c.webp"]  # (the cache, the runs: out_dir=data/runs)
    capsys.readouterr()
    real_scandir = os.scandir

    def no_permission_for_sub(path="."):  # what a chmod 000 folder does to a user who is not root
        if str(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", no_permission_for_sub)
    assert images.find_images(str(data)) == ["a.png", "d.tiff", "e.bmp", "f.gif", "linked/c.webp"]
    assert f"warning: {data / 'sub'}: cannot list this folder (Permission denied)" in capsys.readouterr().err


def test_captions_in_utf8_with_bom_and_utf16_are_read(tmp_path):
    img = str(tmp_path / "a.png")
    cases = [("a caf\xe9 square".encode("utf-8"), "a caf\xe9 square"),
             (b"\xef\xbb\xbfa red   circle\r\n", "a red circle"),          # UTF-8 BOM, CRLF
             ("\ufeffa blue \u00fcber".encode("utf-16-le"), "a blue \u00fcber"),  # Notepad "Unicode"
             ("a red flower\r\n".encode("utf-16-le"), "a red flower"),    # UTF-16 without a BOM
             ("a red flower".encode("utf-16-be"), "a red flower"),
             ("a pale sun".encode("utf-32"), "a pale sun"),                 # UTF-32 (its BOM starts FF FE)
             (b"a\x00 red\x1b[0m \xe2\x80\x8bsquare\x07", "a red[0m square"),  # control, zero-width dropped
             ("a green line".encode("utf-16"), "a green line")]             # BOM in native order
    for raw, want in cases:
        (tmp_path / "a.txt").write_bytes(raw)
        assert images.read_caption(img) == want
    os.rename(tmp_path / "a.txt", tmp_path / "a.TXT")
    assert images.read_caption(img) == "a green line"  # an upper-case extension
    os.rename(tmp_path / "a.TXT", tmp_path / "a.txt")
    (tmp_path / "a.txt").write_bytes(b"\xff\xfea\x00\x00\xd8")  # UTF-16 BOM, then a lone surrogate
    with pytest.raises(images.Skip, match="not UTF-16"):
        images.read_caption(img)


# --- bad inputs, incremental runs, manifest --------------------------------------------------------------

def test_metadata_files_as_spreadsheets_and_scripts_write_them(tmp_path):
    """Column names in any case, unquoted commas in the caption, Windows separators, NFD names, numbers,
    one huge caption, a cut surrogate pair; a metadata file that cannot be read is named in the skip."""
    img = make_image(8, 8)
    os.makedirs(tmp_path / "sub")
    names = ["a.png", "b.png", "sub/c.png", "cafe\u0301.png", "n.png", "long.png", "cut.png"]
    for name in names:
        img.save(tmp_path / name)
    long = "word " * 40000  # past csv's default field limit (131072)
    (tmp_path / "metadata.csv").write_text(
        "File_Name, Text\n"
        "a.png,a red flower, in a garden\n"       # unquoted comma
        'b.png,"a blue, quoted caption"\n'
        "sub\\c.png,a green leaf\n"                # Windows separator
        "caf\u00e9.png,an NFC name\n"               # macOS writes the file name NFD
        "n.png,12345\n"
        f"long.png,{long}\n", encoding="utf-8")
    want = {"a.png": "a red flower, in a garden", "b.png": "a blue, quoted caption", "sub/c.png": "a green leaf",
            "cafe\u0301.png": "an NFC name", "n.png": "12345", "long.png": long.strip()}
    for name, caption in want.items():
        assert images.read_caption(str(tmp_path / name), str(tmp_path)) == caption, name
    os.remove(tmp_path / "metadata.csv")
    lines = [json.dumps({"file_name": "cut.png", "text": "a moon \ud83c"}),  # escaped: \\ud83c
             json.dumps({"file_name": "a.png", "text": "one\u2028two"}, ensure_ascii=False)]  # U+2028 as it is
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert images.read_caption(str(tmp_path / "cut.png"), str(tmp_path)) == "a moon"  # the half emoji dropped
    assert images.read_caption(str(tmp_path / "a.png"), str(tmp_path)) == "one two"  # U+2028 in a JSON line
    lines = [json.dumps({"file_name": "a.png", "text": None}), '{"file_name": "b.png", "text": "a cut line',
             json.dumps({"file_name": "n.png", "text": "a number"}), "", json.dumps(["a", "list"]), ""]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(images.Skip, match="its caption in metadata.jsonl is empty"):  # null: as an empty cell
        images.read_caption(str(tmp_path / "a.png"), str(tmp_path))
    with pytest.raises(images.Skip, match=r"no entry .*\(metadata.jsonl lines 2, 5 are not JSON objects\)$"):
        images.read_caption(str(tmp_path / "b.png"), str(tmp_path))  # why its line was not read
    assert images.read_caption(str(tmp_path / "n.png"), str(tmp_path)) == "a number"  # the rest are read
    os.remove(tmp_path / "metadata.jsonl")
    (tmp_path / "metadata.csv").write_bytes("file_name,text\na.png,caf\u00e9 au lait\n".encode("cp1252"))  # Excel
    with pytest.raises(images.Skip, match=r"no entry .*\(metadata.csv is not UTF-8 \(bad byte at 24\)\)"):
        images.read_caption(str(tmp_path / "a.png"), str(tmp_path))
    (tmp_path / "metadata.csv").write_text("file_name;text\na.png;a red flower, in a garden; at noon\n")
    assert images.read_caption(str(tmp_path / "a.png"), str(tmp_path)) == "a red flower, in a garden; at noon"
    for header, missing in [("image,caption", "file_name column, only image, caption"),  # a Kaggle-style file
                            ("File_Name,Description", "text or caption or prompt column, only file_name, description")]:
        (tmp_path / "metadata.csv").write_text(f"{header}\na.png,a red flower\n")
        with pytest.raises(images.Skip, match=rf"no entry .*\(metadata.csv has no {missing}\)$"):
            images.read_caption(str(tmp_path / "a.png"), str(tmp_path))


def write_bad_inputs(data):
    """Files that must each be skipped with a warning: returns {name: reason}."""
    (data / "zero.png").write_bytes(b"")
    (data / "zero.txt").write_text("a red square")
    buf = io.BytesIO()
    make_image(64, 64).save(buf, format="PNG")
    (data / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (data / "truncated.txt").write_text("a red square")
    (data / "notimage.jpg").write_text("this is text, not a JPEG")
    (data / "notimage.txt").write_text("a red square")
    make_image(32, 32).save(data / "nocaption.png")
    make_image(32, 32).save(data / "emptycap.png")
    (data / "emptycap.txt").write_text("  \n ")
    make_image(32, 32).save(data / "latin1.png")
    (data / "latin1.txt").write_bytes("a caf\xe9 square".encode("latin-1"))
    make_image(12, 12).save(data / "tiny.png")  # 32 px bucket needs 2.7x > max_upscale 2
    (data / "tiny.txt").write_text("a red square")
    os.symlink(data / "gone.png", data / "dangling.png")  # a link to a file that is not there
    (data / "dangling.txt").write_text("a red square")
    for name, raw in [("nul", b"\x00\x00\x00"), ("zerowidth", "\u200b \u2060\ufeff".encode())]:
        make_image(32, 32).save(data / f"{name}.png")  # captions with nothing visible in them
        (data / f"{name}.txt").write_bytes(raw)
    return {"zero.png": "unreadable", "truncated.png": "unreadable", "notimage.jpg": "unreadable",
            "nocaption.png": "missing caption", "emptycap.png": "empty caption",
            "latin1.png": "caption not UTF-8", "tiny.png": "too small", "dangling.png": "not accessible",
            "nul.png": "empty caption", "zerowidth.png": "empty caption"}


def test_bad_inputs_are_reported_skipped_and_the_rest_cached(tmp_path, t5_dir, capsys):
    cfg = pixel_cfg(tmp_path, t5_dir)
    data = tmp_path / "data"
    good = make_image_folder(str(data), [(64, 64), (80, 48), (48, 80), (40, 40)])
    os.makedirs(data / "sub")
    make_image(60, 60).save(data / "sub" / "deep.WEBP")
    (data / "sub" / "deep.caption").write_text("a blue circle", encoding="utf-8")
    latin1_name = os.fsdecode(b"caf\xe9.png")  # a file name that is not UTF-8 (old Windows/Samba archives)
    make_image(32, 32).save(os.path.join(str(data), latin1_name))
    with open(os.path.join(str(data), os.fsdecode(b"caf\xe9.txt")), "w") as f:
        f.write("a yellow star")
    bad = write_bad_inputs(data)
    manifest = P.ensure_cache(cfg)
    err = capsys.readouterr().err
    for name, reason in bad.items():
        assert manifest["skipped"][name]["reason"] == reason
        assert sum(name in line for line in err.splitlines()) == 1  # one warning line naming the file
    assert sorted(manifest["entries"]) == sorted(good + ["sub/deep.WEBP", latin1_name])
    assert P.load_manifest(cfg.cache_dir)["entries"][latin1_name]["file"].startswith("caf_")
    assert {tuple(e["bucket"]) for e in manifest["entries"].values()} == {(32, 32), (40, 24), (24, 40)}
    entry = manifest["entries"]["img_001.png"]  # 80x48 -> the 40x24 bucket
    d = torch.load(os.path.join(cfg.cache_dir, entry["file"]), weights_only=True)
    assert d["latents"].shape == (3, 24, 40) and d["latents"].dtype == torch.float32
    assert d["text"].shape == (8, 32) and d["text"].dtype == torch.bfloat16
    assert d["mask"].dtype == torch.bool and d["bucket"] == (40, 24)
    assert d["caption"] == "a green square on a white background" and d["source"] == "img_001.png"
    assert torch.load(os.path.join(cfg.cache_dir, manifest["entries"]["sub/deep.WEBP"]["file"]),
                      weights_only=True)["caption"] == "a blue circle"
    # manifest on disk: settings and stats equal to the files' own
    on_disk = json.load(open(os.path.join(cfg.cache_dir, "manifest.json")))
    for key in ["latent_space", "vae", "vae_subfolder", "scale", "shift", "text_encoder", "text_dim",
                "max_token_length", "target_resolution", "bucket_align", "max_aspect_ratio",
                "latent_channels", "vae_downsample", "latent_mean", "latent_std"]:
        assert key in on_disk, key
    zs = [torch.load(os.path.join(cfg.cache_dir, e["file"]), weights_only=True)["latents"].flatten(1)
          for e in on_disk["entries"].values()]
    allz = torch.cat(zs, 1).double()
    assert np.allclose(on_disk["latent_mean"], allz.mean(1).numpy(), atol=1e-6)
    assert np.allclose(on_disk["latent_std"], allz.std(1, unbiased=False).numpy(), atol=1e-6)
    assert not [f for f in os.listdir(cfg.cache_dir) if ".tmp" in f]


def test_incremental_runs_encode_only_new_or_changed_files(tmp_path, t5_dir, monkeypatch, capsys):
    cfg = pixel_cfg(tmp_path, t5_dir)
    data = tmp_path / "data"
    make_image_folder(str(data), [(64, 64), (80, 48), (48, 80), (40, 40), (64, 40)])
    (data / "bad.png").write_bytes(b"")
    (data / "bad.txt").write_text("x")
    encoded = []
    real = P.encode_files

    def spy(cfg, todo, *a, **k):
        encoded.append(sorted(todo))
        return real(cfg, todo, *a, **k)

    monkeypatch.setattr(P, "encode_files", spy)
    first = P.ensure_cache(cfg)
    assert len(first["entries"]) == 5 and encoded[-1] == sorted(list(first["entries"]) + ["bad.png"])
    mtimes = {f: os.path.getmtime(os.path.join(cfg.cache_dir, f)) for f in os.listdir(cfg.cache_dir)}

    again = P.ensure_cache(cfg)  # nothing new: no model is even loaded; the bad file is not retried
    assert len(encoded) == 1 and again["entries"] == first["entries"]
    assert {f: os.path.getmtime(os.path.join(cfg.cache_dir, f)) for f in os.listdir(cfg.cache_dir)} == mtimes

    (data / "img_002.txt").write_text("a changed yellow caption")  # caption change -> re-encode that one
    os.utime(data / "img_002.txt", ns=(1, 1))
    os.remove(data / "img_004.png")                                # deleted -> entry and file dropped
    make_image(50, 50).save(data / "new.png")                     # new -> encoded
    (data / "new.txt").write_text("a new square")
    users = ["ckpt-1732419200.pt", "inception-2015-12-05.pt", "my-notes.pt"]  # a user's own files
    for name in users + [P.cache_name("img_000.png") + ".tmp"]:  # and one of ours, left by a killed run
        (tmp_path / "cache" / name).write_bytes(b"x")
    third = P.ensure_cache(cfg)
    ours = {e["file"] for e in third["entries"].values()}
    assert sorted(f for f in os.listdir(cfg.cache_dir) if f not in ours) == sorted(users + ["manifest.json"])
    assert encoded[-1] == ["img_002.png", "new.png"]
    assert sorted(third["entries"]) == ["img_000.png", "img_001.png", "img_002.png", "img_003.png", "new.png"]
    assert not os.path.exists(os.path.join(cfg.cache_dir, first["entries"]["img_004.png"]["file"]))
    d = torch.load(os.path.join(cfg.cache_dir, third["entries"]["img_002.png"]["file"]), weights_only=True)
    assert d["caption"] == "a changed yellow caption"
    assert len([f for f in os.listdir(cfg.cache_dir) if f.endswith(".pt") and f not in users]) == 5

    damaged = os.path.join(cfg.cache_dir, third["entries"]["img_001.png"]["file"])
    with open(damaged, "r+b") as f:  # truncated (a full disk, a killed copy): re-encoded, nothing else
        f.truncate(100)
    os.remove(os.path.join(cfg.cache_dir, third["entries"]["img_003.png"]["file"]))  # deleted: re-encoded
    fourth = P.ensure_cache(cfg)
    assert encoded[-1] == ["img_001.png", "img_003.png"] and fourth["entries"] == third["entries"]
    assert torch.load(damaged, weights_only=True)["caption"] == "a green square on a white background"
    assert sum("missing or damaged" in line for line in capsys.readouterr().err.splitlines()) == 2

    P.ensure_cache(cfg, force=True)  # --force: everything again
    assert len(encoded[-1]) == 6
    capsys.readouterr()
    os.rename(data, tmp_path / "moved")  # only the cache copied to where training runs: used as it is
    assert P.ensure_cache(cfg)["entries"].keys() == fourth["entries"].keys() and len(encoded) == 4
    assert "is not there: using the cache" in capsys.readouterr().err


def test_a_linked_folder_on_a_drive_not_mounted_keeps_its_cached_images(tmp_path, t5_dir, monkeypatch, capsys):
    """A folder that cannot be listed just now (a linked drive not mounted, a permission) is named in a warning
    and what the cache holds from it is kept, as for a file not readable just now (its entries were dropped
    and their cache files deleted, silently for the link, so training went on with part of the data)."""
    cfg = pixel_cfg(tmp_path, t5_dir)
    data, drive = tmp_path / "data", tmp_path / "drive"
    make_image_folder(str(data), [(32, 32)] * 2)
    make_image_folder(str(drive / "photos"), [(32, 32)] * 3)
    os.symlink(drive / "photos", data / "photos")
    first = P.ensure_cache(cfg)
    assert len(first["entries"]) == 5
    os.rename(drive, tmp_path / "unmounted")
    capsys.readouterr()
    again = P.ensure_cache(cfg)
    assert again["entries"] == first["entries"] and P.load_manifest(cfg.cache_dir)["entries"] == first["entries"]
    assert all(os.path.exists(os.path.join(cfg.cache_dir, e["file"])) for e in first["entries"].values())
    assert f"warning: {data / 'photos'}: a link to {drive / 'photos'}, which is not there" in capsys.readouterr().err
    os.rename(tmp_path / "unmounted", drive)
    real_scandir = os.scandir

    def no_permission_for_photos(path="."):
        if str(path).endswith("photos"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", no_permission_for_photos)
    assert P.ensure_cache(cfg)["entries"] == first["entries"]
    monkeypatch.setattr(os, "scandir", real_scandir)
    encoded = record_encoded(monkeypatch)
    assert P.ensure_cache(cfg)["entries"] == first["entries"] and encoded == []  # back: nothing to encode


def test_a_metadata_file_saved_unreadable_keeps_what_was_cached_from_it(tmp_path, t5_dir, monkeypatch, capsys):
    """metadata.csv saved again by Excel in cp1252 (one 'cafe' with an accent) costs none of the images cached
    from it: each is named in a warning, what was cached kept, and the fixed file encodes nothing again (its
    entries were dropped and their cache files deleted: all the folder's images encoded again)."""
    cfg = pixel_cfg(tmp_path, t5_dir)
    data = tmp_path / "data"
    os.makedirs(data)
    for i in range(3):
        make_image(32, 32, seed=i).save(data / f"{i}.png")
    good = "file_name,text\n0.png,a red square\n1.png,a blue circle\n2.png,a green star\n"
    (data / "metadata.csv").write_text(good, encoding="utf-8")
    first = P.ensure_cache(cfg)
    assert len(first["entries"]) == 3
    (data / "metadata.csv").write_bytes((good + "3.png,caf\u00e9 au lait\n").encode("cp1252"))
    capsys.readouterr()
    again = P.ensure_cache(cfg)
    assert again["entries"] == first["entries"] and not again["skipped"]
    assert all(os.path.exists(os.path.join(cfg.cache_dir, e["file"])) for e in first["entries"].values())
    assert sum("metadata.csv is not UTF-8" in line for line in capsys.readouterr().err.splitlines()) == 3
    make_image(32, 32, seed=3).save(data / "3.png")  # not cached before: skipped until the file is fixed
    assert P.ensure_cache(cfg)["skipped"]["3.png"]["reason"] == "metadata unreadable"
    (data / "metadata.csv").write_text(good + "3.png,a yellow moon\n", encoding="utf-8")
    encoded = record_encoded(monkeypatch)
    assert len(P.ensure_cache(cfg)["entries"]) == 4 and encoded == ["3.png"]  # the other three: as cached


def test_repeated_captions_are_encoded_once_with_the_same_embeddings(tmp_path, t5_dir, monkeypatch):
    import text_encoder as TE
    cfg = pixel_cfg(tmp_path, t5_dir)
    data = tmp_path / "data"
    make_image_folder(str(data), [(40, 40)] * 7)
    captions = ["a red circle", "a blue square", "a red circle", "a red circle", "a green triangle",
                "a blue square", "a red circle"]
    for i, text in enumerate(captions):
        (data / f"img_{i:03d}.txt").write_text(text)
    seen, real = [], TE.load_text_encoder

    def spy(*a, **k):
        encoder = real(*a, **k)
        encode = encoder.encode
        encoder.encode = lambda caps: (seen.extend(caps), encode(caps))[1]
        return encoder

    monkeypatch.setattr(TE, "load_text_encoder", spy)
    entries = P.ensure_cache(cfg)["entries"]
    assert sorted(seen) == sorted(set(captions))                   # 3 batches of 3 images, each caption once
    direct = real(cfg)
    for i, text in enumerate(captions):
        d = torch.load(os.path.join(cfg.cache_dir, entries[f"img_{i:03d}.png"]["file"]), weights_only=True)
        emb, mask = direct.encode([text])
        assert d["caption"] == text and torch.equal(d["mask"], mask[0])
        torch.testing.assert_close(d["text"], emb[0].to(torch.bfloat16))  # batching may differ by rounding


def test_an_interrupted_run_keeps_what_it_encoded_and_the_cache_usable(tmp_path, t5_dir, monkeypatch):
    from dataset import CachedDataset
    from latents import LatentSpace
    cfg = pixel_cfg(tmp_path, t5_dir, val_fraction=0.0)
    data = str(tmp_path / "data")
    make_image_folder(data, [(32, 32)] * 3)
    first = P.ensure_cache(cfg)
    for i in range(6):
        make_image(32, 32, seed=10 + i).save(os.path.join(data, f"more_{i}.png"))
        open(os.path.join(data, f"more_{i}.txt"), "w").write("a blue square")
    calls, real = [], LatentSpace.encode

    def dies_on_second_batch(self, images, normalize=True):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # like Ctrl-C after the first batch's files were written
        return real(self, images, normalize)

    monkeypatch.setattr(LatentSpace, "encode", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt, match="the 3 images encoded so far are cached"):
        P.ensure_cache(cfg)
    kept = P.load_manifest(cfg.cache_dir)["entries"]  # the old entries and the first batch (3) of new ones
    assert len(kept) == 6 and all(kept[k] == e for k, e in first["entries"].items())
    assert len(CachedDataset(cfg)) == 6
    monkeypatch.setattr(LatentSpace, "encode", real)
    encoded = record_encoded(monkeypatch)
    done = P.ensure_cache(cfg)
    assert len(done["entries"]) == 9 and len(encoded) == 3  # the re-run encodes the rest only
    assert sorted(f for f in os.listdir(cfg.cache_dir) if f.endswith(".pt")) == \
        sorted(e["file"] for e in done["entries"].values())
    os.makedirs(tmp_path / "empty")
    with pytest.raises(P.CacheError, match="no images"):
        P.ensure_cache(pixel_cfg(tmp_path, t5_dir, data_dir=str(tmp_path / "empty"), cache_dir=str(tmp_path / "c2")))


def test_a_run_killed_outright_keeps_the_batches_of_its_last_progress_manifest(tmp_path, t5_dir, monkeypatch):
    """SIGKILL (the out-of-memory killer, kill -9, a power cut) runs no handler: the manifest written while
    encoding (every PROGRESS_EVERY seconds; here after every batch) names what was encoded before it."""
    from latents import LatentSpace
    cfg = pixel_cfg(tmp_path, t5_dir)
    make_image_folder(str(tmp_path / "data"), [(32, 32)] * 8)
    calls, real = [], LatentSpace.encode

    class Killed(BaseException):  # like SIGKILL: nothing catches it, nothing is written after it
        pass

    def killed_in_third_batch(self, images, normalize=True):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return real(self, images, normalize)

    monkeypatch.setattr(P, "PROGRESS_EVERY", 0)
    monkeypatch.setattr(LatentSpace, "encode", killed_in_third_batch)
    with pytest.raises(Killed):
        P.ensure_cache(cfg)
    kept = P.load_manifest(cfg.cache_dir)  # the first batch or both (preprocess_batch_size=3): a manifest
    assert kept is not None and len(kept["entries"]) in (3, 6)  # takes at most 5% of the time
    monkeypatch.setattr(LatentSpace, "encode", real)
    encoded = record_encoded(monkeypatch)
    assert len(P.ensure_cache(cfg)["entries"]) == 8 and len(encoded) == 8 - len(kept["entries"])  # the rest only


def test_a_full_disk_keeps_what_was_encoded_and_says_so(tmp_path, t5_dir, monkeypatch):
    cfg = pixel_cfg(tmp_path, t5_dir, preprocess_batch_size=2)
    make_image_folder(str(tmp_path / "data"), [(32, 32)] * 7)
    real_save, written = torch.save, []

    def save(obj, f, *a, **k):  # the disk fills up at the fifth cache file: a partial file, RuntimeError
        if len(written) == 4:
            with open(f, "wb") as out:
                out.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 918")
        written.append(f)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match=r"\.pt: not written \(RuntimeError.*disk full.*the 4 images encoded before"):
        P.ensure_cache(cfg)
    kept = P.load_manifest(cfg.cache_dir)["entries"]
    assert len(kept) == 4 and sorted(os.listdir(cfg.cache_dir)) == sorted(
        [e["file"] for e in kept.values()] + ["manifest.json"])  # no partial or temp files
    monkeypatch.setattr(torch, "save", real_save)
    encoded = record_encoded(monkeypatch)
    assert len(P.ensure_cache(cfg)["entries"]) == 7 and len(encoded) == 3  # the re-run encodes the rest only


def test_a_run_started_elsewhere_or_a_moved_project_keeps_the_cache(tmp_path, t5_dir, monkeypatch, capsys):
    """The cache remembers data_dir and a local text_encoder (or vae) folder as given (relative: from where the
    run started) and as absolute paths: a job started in another folder with the absolute paths re-encodes
    nothing and is no 'other settings' error (the relative paths alone would name other folders from there), and
    neither does a moved project run from its folder; another data folder re-encodes."""
    import shutil
    project = tmp_path / "project"
    make_image_folder(str(project / "data"), [(32, 32), (40, 24), (24, 40)])
    shutil.copytree(t5_dir, project / "models" / "t5")
    monkeypatch.chdir(project)
    cfg = pixel_cfg(tmp_path, t5_dir, data_dir="data", cache_dir="cache", text_encoder="models/t5")
    assert len(P.ensure_cache(cfg)["entries"]) == 3
    encoded = record_encoded(monkeypatch)
    elsewhere = tmp_path / "jobs"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    by_path = pixel_cfg(tmp_path, t5_dir, data_dir=str(project / "data"), cache_dir=str(project / "cache"),
                        text_encoder=str(project / "models" / "t5"))
    assert len(P.ensure_cache(by_path)["entries"]) == 3 and encoded == []
    assert len(P.ensure_cache(by_path)["entries"]) == 3 and encoded == []  # (its manifest now names the path)
    monkeypatch.chdir(project)  # and back: the relative spelling again
    assert len(P.ensure_cache(cfg)["entries"]) == 3 and encoded == []
    shutil.copytree(project, tmp_path / "moved")  # (copy2: the files keep their times)
    monkeypatch.chdir(tmp_path / "moved")
    assert len(P.ensure_cache(cfg)["entries"]) == 3 and encoded == []
    other = tmp_path / "other"
    make_image_folder(str(other), [(32, 32)])
    capsys.readouterr()
    P.ensure_cache(pixel_cfg(tmp_path, t5_dir, data_dir=str(other), cache_dir="cache", text_encoder="models/t5"))
    assert encoded == ["img_000.png"] and "data_dir changed" in capsys.readouterr().out


def test_failures_mid_run_cost_one_file_or_keep_what_was_encoded(tmp_path, t5_dir, monkeypatch, capsys):
    """A file gone or failing while preprocess runs is skipped (and tried again next run); an error in the
    encoder (here: out of memory, then any other) keeps the batches encoded before it; a changed
    max_upscale retries the images it skipped; another spelling of data_dir re-encodes nothing."""
    import latents
    cfg = pixel_cfg(tmp_path, t5_dir)
    data = tmp_path / "data"
    make_image_folder(str(data), [(32, 32)] * 6)
    make_image(12, 12).save(data / "small.png")  # 2.7x upscale: skipped at max_upscale=2
    (data / "small.txt").write_text("a small square")
    real_load = P.load_image

    def flaky(path, *a, **k):
        if path.endswith("img_001.png"):  # deleted after it was listed
            return real_load(path + ".gone", *a, **k)
        if path.endswith("img_002.png"):
            raise ValueError("an odd failure inside a decoder")
        return real_load(path, *a, **k)

    monkeypatch.setattr(P, "load_image", flaky)
    manifest = P.ensure_cache(cfg)
    assert {s: e["reason"] for s, e in manifest["skipped"].items()} == {
        "img_001.png": "not accessible", "img_002.png": "unreadable", "small.png": "too small"}
    assert "ValueError: an odd failure" in manifest["skipped"]["img_002.png"]["message"]
    monkeypatch.setattr(P, "load_image", real_load)
    encoded = record_encoded(monkeypatch)
    assert len(P.ensure_cache(cfg)["entries"]) == 5 and encoded == ["img_001.png"]  # the broken one: not again
    encoded.clear()
    again = P.ensure_cache(pixel_cfg(tmp_path, t5_dir, data_dir=str(data) + "/", max_upscale=3.0))
    assert encoded == ["small.png"] and len(again["entries"]) == 6  # only the skip whose setting changed
    os.utime(data / "img_003.png", ns=(1, 1))  # changed, and then not readable while preprocess runs:
    monkeypatch.setattr(P, "load_image", lambda path, *a, **k: real_load(path + ".gone", *a, **k)
                        if path.endswith("img_003.png") else real_load(path, *a, **k))
    kept = P.ensure_cache(cfg)
    assert kept["entries"]["img_003.png"] == again["entries"]["img_003.png"]  # its cached file is kept
    assert "img_003.png" not in kept["skipped"]

    def warns(path, *a, **k):  # what Pillow does for a JPEG with broken EXIF: a Python warning
        warnings.warn_explicit("Corrupt EXIF data", UserWarning, "TiffImagePlugin.py", 1, module="PIL.Tiff")
        return real_load(path, *a, **k)

    monkeypatch.setattr(P, "load_image", warns)
    for name in ("img_004.png", "img_005.png"):
        os.utime(data / name, ns=(1, 1))  # changed: read again
    capsys.readouterr()
    P.ensure_cache(cfg)
    err = sorted(line for line in capsys.readouterr().err.splitlines() if "Corrupt EXIF" in line)  # threads
    assert err == [f"warning: {data / n}: UserWarning: Corrupt EXIF data" for n in ("img_003.png", "img_004.png",
                                                                                   "img_005.png")]  # one each
    monkeypatch.setattr(P, "load_image", real_load)

    shutil.rmtree(cfg.cache_dir)
    real_to_tensor, calls = latents.images_to_tensor, {"n": 0}

    def nan_in_first(*a, **k):  # what a VAE run in too low a precision gives
        images = real_to_tensor(*a, **k)
        images[0, 0, 0, 0] = float("nan")
        return images

    monkeypatch.setattr(latents, "images_to_tensor", nan_in_first)
    skipped = P.ensure_cache(cfg)["skipped"]
    assert sorted(s for s, e in skipped.items() if e["reason"] == "non-finite encoding") == ["img_000.png",
                                                                                            "img_003.png"]
    shutil.rmtree(cfg.cache_dir)
    for error, caught in [(torch.OutOfMemoryError("CUDA out of memory"), P.CacheError),
                          (RuntimeError("a kernel failed"), RuntimeError)]:
        def failing_second_batch(*a, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                raise error
            return real_to_tensor(*a, **k)

        calls["n"] = 0
        monkeypatch.setattr(latents, "images_to_tensor", failing_second_batch)
        with pytest.raises(caught) as info:
            P.ensure_cache(cfg)
        kept = P.load_manifest(cfg.cache_dir)["entries"]
        assert len(kept) == 3  # the first batch of preprocess_batch_size=3
        text = str(info.value) + " ".join(getattr(info.value, "__notes__", []))
        assert "3 images encoded before it are cached" in text
        if caught is P.CacheError:
            assert "out of memory" in text and "preprocess_batch_size" in text
        shutil.rmtree(cfg.cache_dir)


def test_a_cache_built_with_other_settings_is_an_error(tmp_path, t5_dir):
    cfg = pixel_cfg(tmp_path, t5_dir)
    make_image_folder(str(tmp_path / "data"), [(32, 32), (40, 24)])
    manifest = P.ensure_cache(cfg)
    other = pixel_cfg(tmp_path, t5_dir, max_token_length=6)
    with pytest.raises(P.CacheError, match="max_token_length=8 but the config has max_token_length=6"):
        P.ensure_cache(other)
    with pytest.raises(P.CacheError, match="target_resolution=32.*target_resolution=48"):
        P.check_manifest(pixel_cfg(tmp_path, t5_dir, target_resolution=48), manifest)
    rebuilt = P.ensure_cache(other, force=True)
    assert rebuilt["max_token_length"] == 6 and len(rebuilt["entries"]) == 2
    for damage in ("{not json", "[1, 2]", '{"version": 0}', '{"version": 1, "entries": {"a.png": {"file": "a.pt"}}}'):
        with open(os.path.join(cfg.cache_dir, "manifest.json"), "w") as f:
            f.write(damage)
        with pytest.raises(P.CacheError, match="manifest.json.*python preprocess.py rebuilds it"):
            P.load_manifest(cfg.cache_dir)
    repaired = P.ensure_cache(other)  # preprocess (and so train.py) re-encodes everything
    assert repaired["entries"] == rebuilt["entries"] and P.load_manifest(cfg.cache_dir) == repaired
    # another spelling of the same encoder folder (a trailing slash, relative) is the same setting
    for spelling in (t5_dir + "/", os.path.relpath(t5_dir)):
        P.check_manifest(pixel_cfg(tmp_path, t5_dir, max_token_length=6, text_encoder=spelling), repaired)
    with pytest.raises(P.CacheError, match="text_encoder="):
        P.check_manifest(pixel_cfg(tmp_path, t5_dir, max_token_length=6, text_encoder=str(tmp_path)), repaired)


def test_a_manifest_without_entries_binds_no_settings(tmp_path, t5_dir, capsys):
    """A first run that failed before encoding anything (e.g. a wrong setting) must not block the fixed
    command with 'built with other settings'. Captions that fill max_token_length are counted in a note."""
    cfg = pixel_cfg(tmp_path, t5_dir, max_token_length=6)
    make_image_folder(str(tmp_path / "data"), [(32, 32), (40, 24)])
    os.makedirs(cfg.cache_dir)
    P.write_manifest(cfg.cache_dir, {"version": 1, **{k: "other" for k in P.CACHE_SETTINGS}, "entries": {},
                                     "skipped": {}})
    manifest = P.ensure_cache(cfg)
    assert len(manifest["entries"]) == 2 and manifest["max_token_length"] == 6
    out = capsys.readouterr().out  # "a red square on a white background": 7 words + </s> > 6 tokens
    assert "note: 2 caption(s) fill all max_token_length=6 tokens: probably cut" in out


def test_split_for_rank_is_disjoint_and_covers_everything():
    items = [f"f{i}" for i in range(23)]
    for world in (1, 2, 3, 8):
        shares = [P.split_for_rank(items, r, world) for r in range(world)]
        assert sorted(sum(shares, [])) == sorted(items)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_flux_vae_and_t5gemma2_end_to_end_through_the_cli(tmp_path, monkeypatch, capsys):
    """The flowers-style setup on tiny models saved to disk, through the same from_pretrained calls."""
    save_tiny_vae(str(tmp_path / "vae"))
    save_tiny_t5gemma2(str(tmp_path / "t5gemma2"))
    make_image_folder(str(tmp_path / "data"), [(64, 64), (96, 48), (48, 96)])
    args = ["tiny", "data_source=folder", f"data_dir={tmp_path / 'data'}", f"cache_dir={tmp_path / 'cache'}",
            "latent_space=flux", f"vae={tmp_path / 'vae'}", "latent_channels=16", "vae_downsample=8",
            "target_resolution=32", "bucket_align=16", "max_aspect_ratio=3",
            f"text_encoder={tmp_path / 't5gemma2'}", "text_encoder_type=t5gemma2", "text_dim=32",
            "max_token_length=8"]
    monkeypatch.setattr(sys, "argv", ["preprocess.py"] + args + ["--force"])
    P.main()
    out = capsys.readouterr().out
    assert "3 samples" in out and "3 encoded" in out
    manifest = P.load_manifest(str(tmp_path / "cache"))
    assert (manifest["scale"], manifest["shift"]) == (0.3611, 0.1159)
    shapes = {tuple(e["latent_shape"]) for e in manifest["entries"].values()}
    assert shapes == {(16, 4, 4), (16, 2, 6), (16, 6, 2)}  # buckets 32x32, 48x16, 16x48 at 8x down

    import check_cache
    monkeypatch.setattr(sys, "argv", ["check_cache.py"] + args + ["--decode", "2"])
    check_cache.main()
    out = capsys.readouterr().out
    assert "PSNR" in out and "checked 3 files (0 damaged)" in out
    written = sorted(os.listdir(tmp_path / "cache" / "check"))
    assert len(written) == 4 and sum(f.endswith("_decoded.png") for f in written) == 2
    assert Image.open(tmp_path / "cache" / "check" / written[0]).size in {(32, 32), (48, 16), (16, 48)}
    first = os.path.join(tmp_path / "cache", sorted(manifest["entries"].values(), key=lambda e: e["file"])[0]["file"])
    with open(first, "r+b") as f:
        f.truncate(300)  # damaged: reported, left out of --decode, exit code 1
    monkeypatch.setattr(sys, "argv", ["check_cache.py"] + args + ["--decode", "5"])
    with pytest.raises(SystemExit) as exit_code:
        check_cache.main()
    out = capsys.readouterr()
    assert exit_code.value.code == 1 and "checked 3 files (1 damaged)" in out.out and out.err.count("warning") == 1
    assert out.out.count("PSNR") == 2  # the two intact files, each once
    for bad in (["--decode", "-3"], ["--decode"]):
        monkeypatch.setattr(sys, "argv", ["check_cache.py"] + args + bad)
        with pytest.raises(ConfigError, match="--decode needs a number of entries"):
            check_cache.main()


def test_shapes_source_generates_then_caches(tmp_path):
    cfg = get_config("tiny", data_dir=str(tmp_path / "shapes"), cache_dir=str(tmp_path / "cache"), num_shapes=6)
    manifest = P.ensure_cache(cfg)  # the default MiniLM encoder, pixel space
    assert len(manifest["entries"]) == 6 and manifest["text_dim"] == 384
    d = torch.load(os.path.join(cfg.cache_dir, next(iter(manifest["entries"].values()))["file"]),
                   weights_only=True)
    assert d["text"].shape == (16, 384) and d["latents"].shape == (3, 16, 16)



def test_two_ranks_split_the_work_and_rank0_writes_one_manifest(tmp_path, t5_dir):
    """torchrun-style: two processes (gloo on CPU) each encode half; rank 0 writes the manifest."""
    import subprocess
    from conftest import on_a_free_port, probe_marks, teardown_probe
    cfg = pixel_cfg(tmp_path, t5_dir)
    names = make_image_folder(str(tmp_path / "data"), [(32, 32), (40, 24), (24, 40), (48, 48), (64, 40)])
    args = ["tiny", "data_source=folder", f"data_dir={cfg.data_dir}", f"cache_dir={cfg.cache_dir}",
            "target_resolution=32", f"text_encoder={t5_dir}", "text_dim=32", "max_token_length=8"]
    outs, codes = [], []
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(teardown_probe(tmp_path))

    def run(port):
        procs = [subprocess.Popen([sys.executable, "preprocess.py", *args], cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONPATH": str(hooks),
                                       "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                       "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
                 for r in range(2)]
        outs[:] = [p.communicate(timeout=180)[0] for p in procs]
        codes[:] = [p.returncode for p in procs]
        return "\n".join(outs)

    on_a_free_port(run)
    assert codes == [0, 0], outs
    assert "5 samples" in outs[0] and "5 encoded" in outs[0] and "samples" not in outs[1]  # rank 0 reports
    # each ends with os._exit, not the interpreter's teardown (where gloo's threads, kept alive by the text
    # encoder's from_pretrained, now and then abort the process: exit code -6 after a complete cache)
    assert probe_marks(tmp_path) == ["started0", "started1"]
    manifest = P.load_manifest(cfg.cache_dir)
    assert sorted(manifest["entries"]) == sorted(names)
    assert all(os.path.exists(os.path.join(cfg.cache_dir, e["file"])) for e in manifest["entries"].values())
    # the same files encoded by one process give the same cache
    single = P.ensure_cache(pixel_cfg(tmp_path, t5_dir, cache_dir=str(tmp_path / "single")), verbose=False)
    for name in names:
        a = torch.load(os.path.join(cfg.cache_dir, manifest["entries"][name]["file"]), weights_only=True)
        b = torch.load(os.path.join(tmp_path / "single", single["entries"][name]["file"]), weights_only=True)
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["text"], b["text"])


def test_a_rank_that_stops_encoding_stops_the_others(tmp_path, t5_dir, monkeypatch):
    """Under torchrun every rank encodes a share; if one stops (a full disk, out of memory), the others
    must stop too, with what was encoded in the manifest (not go on to wait for it in the next collective)."""
    import torch.distributed as dist
    cfg = pixel_cfg(tmp_path, t5_dir)
    make_image_folder(str(tmp_path / "data"), [(32, 32), (40, 24), (24, 40), (48, 48)])

    def gather(out, mine):  # rank 1 encoded nothing and ran out of disk
        out[:] = [mine, ({}, {}, "WriteError: cache/x.pt: no space left on device")]

    for name, value in (("is_available", lambda: True), ("is_initialized", lambda: True),
                        ("get_world_size", lambda: 2), ("get_rank", lambda: 0), ("barrier", lambda: None),
                        ("all_gather_object", gather)):
        monkeypatch.setattr(dist, name, value)
    with pytest.raises(P.CacheError, match=r"rank 1 stopped encoding \(WriteError: .*no space left.*\): the 2 "
                                           "images encoded before it are cached"):
        P.ensure_cache(cfg, distributed=True)
    assert len(P.load_manifest(cfg.cache_dir)["entries"]) == 2  # rank 0's half (every other image)


@pytest.mark.parametrize("script", ["preprocess.py", "train.py"])
def test_sigterm_keeps_what_was_encoded(tmp_path, script):
    """`kill` (a cluster's time limit) stops preprocess.py, or train.py refreshing its cache, like Ctrl-C:
    exit 130, the manifest names what was encoded until then."""
    import signal
    import subprocess
    args = ["tiny", f"data_dir={tmp_path / 'shapes'}", f"cache_dir={tmp_path / 'cache'}", "num_shapes=4000"]
    p = subprocess.Popen([sys.executable, script, *args, f"out_dir={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = b""
    while b"encode:" not in seen or not re.search(rb"encode: +\d+%\|[^|]*\| [1-9]\d\d+/", seen):
        chunk = p.stdout.read1(4096)  # tqdm's bar: wait until some hundreds of images are encoded
        assert chunk, seen.decode(errors="replace")[-500:]
        seen += chunk
    p.send_signal(signal.SIGTERM)
    out = (seen + p.communicate(timeout=120)[0]).decode(errors="replace")
    assert p.returncode == 130, out[-500:]
    kept = P.load_manifest(str(tmp_path / "cache"))["entries"]
    assert f"interrupted: the {len(kept)} images encoded so far are cached" in out
    assert 0 < len(kept) < 4000


def test_check_cache_goes_on_when_a_decoded_png_cannot_be_written(tiny_data, tmp_path, monkeypatch, capsys):
    """A full disk under <cache_dir>/check: one warning per PNG, the other decodes and the summary go on, exit 1
    (as for damaged files), not one error and exit 2 at the first PNG."""
    import errno
    import check_cache
    cache = tmp_path / "cache"
    shutil.copytree(tiny_data["cache_dir"], cache)  # (the shared cache stays as it is)
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        if str(fp).endswith("_decoded.png"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", save)
    monkeypatch.setattr(sys, "argv", ["check_cache.py", "tiny", f"data_dir={tiny_data['data_dir']}",
                                      f"cache_dir={cache}", "--decode", "3"])
    with pytest.raises(SystemExit) as exit_code:
        check_cache.main()
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert exit_code.value.code == 1 and len(warnings) == 3, err
    assert all(w.endswith("_decoded.png: not written (No space left on device)") for w in warnings)
    assert "(0 damaged)" in out and "3 PNGs not written" in out
    assert not any(f.endswith("_decoded.png") for f in os.listdir(cache / "check"))


def test_a_mistyped_local_model_folder_is_not_called_a_hub_id(tiny_data, tmp_path, monkeypatch):
    """preprocess.py text_encoder=/no/such/folder: 'no such folder', not a hub login hint."""
    for key in ("text_encoder", "vae"):
        extra = ["latent_space=flux", "latent_channels=16", "vae_downsample=8", "bucket_align=16"] \
            if key == "vae" else []
        missing = str(tmp_path / f"no_{key}")
        monkeypatch.setattr(sys, "argv", ["preprocess.py", "tiny", f"data_dir={tiny_data['data_dir']}",
                                          f"cache_dir={tmp_path / key}", f"{key}={missing}", *extra])
        with pytest.raises(ConfigError) as e:
            P.main()
        assert str(e.value) == f"{key}={missing!r}: no such folder"


def test_check_cache_compares_with_the_image_as_preprocess_decoded_it(tmp_path, t5_dir, monkeypatch, capsys):
    """A big JPEG is encoded from its reduced-scale decode: --decode compares with that one (pixel space:
    lossless, PSNR inf; was ~53 dB against the full decode, which looks like a damaged cache)."""
    import check_cache
    cfg = pixel_cfg(tmp_path, t5_dir)
    os.makedirs(cfg.data_dir)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).resize((1600, 1200), Image.BICUBIC).save(
        os.path.join(cfg.data_dir, "photo.jpg"), quality=95)
    (tmp_path / "data" / "photo.txt").write_text("a photo")
    P.ensure_cache(cfg)
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["check_cache.py", "tiny"] + [f"{k}={getattr(cfg, k)}" for k in (
        "data_source", "data_dir", "cache_dir", "target_resolution", "text_encoder", "text_dim", "max_token_length")]
        + ["--decode", "1"])
    check_cache.main()
    line = next(line for line in capsys.readouterr().out.splitlines() if "photo.jpg: " in line)
    assert line.endswith("PSNR inf dB"), line


def check_cache_exit(tiny_data, cache, monkeypatch, capsys) -> tuple:
    """(exit code, stdout, stderr) of check_cache.py on the tiny preset's data with this cache."""
    import check_cache
    monkeypatch.setattr(sys, "argv", ["check_cache.py", "tiny", f"data_dir={tiny_data['data_dir']}",
                                      f"cache_dir={cache}"])
    with pytest.raises(SystemExit) as exit_code:
        check_cache.main()
    return (exit_code.value.code, *capsys.readouterr())


def test_check_cache_reports_a_file_without_a_mask_or_with_nan_latents(tiny_data, tmp_path, monkeypatch, capsys):
    """A cache file that loads but is not what preprocess.py writes (no mask, a mask of another kind) or holds
    nan latents is damaged: a warning naming it and exit code 1, not a traceback or nan statistics."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_data["cache_dir"], cache)
    files = sorted(f for f in os.listdir(cache) if f.endswith(".pt"))
    for name, change in zip(files, ({"mask": "zz"}, {"mask": None}, {"latents": float("nan")})):
        d = torch.load(cache / name, weights_only=True)
        for key, value in change.items():
            if value is None:
                del d[key]
            elif isinstance(value, float):
                d[key] = torch.full_like(d[key], value)
            else:
                d[key] = value
        torch.save(d, cache / name)
    code, out, err = check_cache_exit(tiny_data, cache, monkeypatch, capsys)
    assert code == 1 and "(3 damaged)" in out and "nan" not in out.split("latent mean")[1]
    assert all(f"{name}:" in err for name in files[:3]), err


def test_check_cache_finds_latents_changed_in_a_file_that_loads(tiny_data, tmp_path, monkeypatch, capsys):
    """Bytes changed in a cache file's tensor data (a failing disk, a bad copy) load without error: its latents
    and text embeddings are checked against the sums the manifest recorded when it was written, and the fix is
    named."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_data["cache_dir"], cache)
    names = sorted(f for f in os.listdir(cache) if f.endswith(".pt"))[1:3]
    for name, key in zip(names, ("latents", "text")):
        d = torch.load(cache / name, weights_only=True)
        d[key][0, 0] += 0.5  # one value, as a flipped bit in its exponent or mantissa would change it
        torch.save(d, cache / name)
    code, out, err = check_cache_exit(tiny_data, cache, monkeypatch, capsys)
    assert code == 1 and "(2 damaged)" in out
    assert f"{names[0]}: latents differ" in err and f"{names[1]}: text embeddings" in err
    assert "delete them and run python preprocess.py" in err
    import subprocess  # python -O drops assert statements: the checks must not be asserts
    r = subprocess.run([sys.executable, "-O", "check_cache.py", "tiny", f"data_dir={tiny_data['data_dir']}",
                        f"cache_dir={cache}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "(2 damaged)" in r.stdout, r.stdout + r.stderr


def test_under_torchrun_a_second_sigterm_does_not_cut_short_the_first(monkeypatch):
    """torchrun passes its SIGTERM on to each worker twice: the first stops encoding (what was encoded goes into
    the manifest), the second, raised while the ranks gathered their entries, lost that manifest."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    before = signal.getsignal(signal.SIGTERM)
    raised = []
    try:
        signal.signal(signal.SIGTERM, P.raise_interrupt)
        for _ in range(2):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            except KeyboardInterrupt:  # (caught here: it would end the whole test session)
                raised.append(1)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert raised == [1]
