"""Reading training images and captions, and aspect-ratio buckets: the file-level half of preprocess.py.

Buckets follow the NovelAI/SDXL multi-aspect scheme: about target**2 pixels each, sides multiples of an
alignment, aspect ratios up to a limit. An image goes to the bucket nearest its own aspect ratio, is
resized to cover it (Lanczos) and centre-cropped. Images of any PIL mode become RGB with their EXIF
orientation applied and their colour profile (if not sRGB) converted to sRGB; a caption is the .txt or
.caption file of the same stem, else a row of a metadata.jsonl / metadata.csv (Hugging Face imagefolder) in
the image's folder or one above it. A bad file raises Skip, which preprocess.py and check_cache.py report in
one line and go on.
"""
import codecs
import csv
import functools
import io
import json
import math
import os
import sys
import unicodedata

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".avif", ".bmp", ".gif", ".tif", ".tiff")  # GIF/TIFF: frame 1
CAPTION_EXTS = (".txt", ".caption")
# images in formats load_image does not read: named in one warning, not left out silently (iPhone HEIC, RAW)
OTHER_IMAGE_EXTS = (".heic", ".heif", ".jxl", ".jp2", ".svg", ".psd", ".dng", ".cr2", ".cr3", ".nef", ".arw",
                    ".raf", ".orf", ".rw2", ".exr", ".hdr")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # Hugging Face imagefolder captions, one file per folder
CAPTION_COLUMNS = ("text", "caption", "prompt")


class Skip(Exception):
    """A bad input file: reason is the summary's category, the message says what is wrong."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


class MetadataProblem(str):
    """What is wrong with a metadata.jsonl / metadata.csv none of whose rows could be read."""


# --- buckets -------------------------------------------------------------------------------------------

def make_buckets(target: int, align: int, max_ratio: float) -> list:
    """(W, H) buckets of about target**2 pixels, sides multiples of align, aspect within 1/max_ratio..max_ratio.

    For every width, the height whose area is nearest target**2; both orientations; sorted by W/H.
    """
    area = target * target
    buckets = set()
    w = align
    while w * w <= area * max_ratio + align * align:
        h_low = max(align, (area // w) // align * align)
        h = min((h_low, h_low + align), key=lambda h: abs(w * h - area))  # nearest area
        if max(w / h, h / w) <= max_ratio + 1e-9:
            buckets.update({(w, h), (h, w)})
        w += align
    if not buckets:  # e.g. max_aspect_ratio=1 with target not a multiple of align: each width's nearest-area
        low = max(align, target // align * align)  # height is beyond the ratio; then the square nearest in area
        side = min((low, low + align), key=lambda s: abs(s * s - area))
        buckets.add((side, side))
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def bucket_for(width: int, height: int, buckets) -> tuple:
    """The bucket nearest an image's aspect ratio (in log space, so 2:1 and 1:2 are equally far from 1:1)."""
    log_ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - log_ratio))


def decode_min_side(buckets) -> int:
    """load_image's min_side for these buckets: twice the largest side, so the Lanczos resize after a
    reduced-scale JPEG decode still shrinks by 2x or more."""
    return 2 * max(max(b) for b in buckets)


def upscale_needed(width: int, height: int, bucket) -> float:
    """How much an image must be enlarged to cover the bucket (<= 1: it is only shrunk)."""
    return max(bucket[0] / width, bucket[1] / height)


def area_kept(width: int, height: int, bucket) -> float:
    """The fraction of an image that resize_and_crop keeps (1 = nothing cropped)."""
    return min(bucket[0] * height, bucket[1] * width) / max(bucket[0] * height, bucket[1] * width)


def resize_and_crop(img: Image.Image, size) -> Image.Image:
    """Resize (Lanczos) so the image covers size=(W, H), then centre-crop to exactly (W, H)."""
    W, H = size
    s = upscale_needed(img.width, img.height, size)
    new = (max(W, round(img.width * s)), max(H, round(img.height * s)))
    if new != img.size:
        img = img.resize(new, Image.LANCZOS)
    left, top = (new[0] - W) // 2, (new[1] - H) // 2
    return img.crop((left, top, left + W, top + H))


# --- reading images and captions -----------------------------------------------------------------------

def in_srgb(img: Image.Image) -> Image.Image:
    """An image with an embedded colour profile other than sRGB (a phone's Display P3, Adobe RGB, a printer's
    CMYK) converted to sRGB, as a browser shows it: read as sRGB its colours were off (P3: paler). Without a
    profile, with an sRGB one, or with one that cannot be used: as it is."""
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "RGBA", "CMYK", "L"):
        return img
    from PIL import ImageCms
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" in ImageCms.getProfileDescription(profile).lower():  # most cameras' JPEGs: nothing to do
            return img
        alpha = img.getchannel("A") if img.mode == "RGBA" else None
        out = ImageCms.profileToProfile(img.convert("RGB") if alpha else img, profile,
                                        ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):  # a damaged profile, or one of another colour space
        return img
    if alpha is not None:
        out.putalpha(alpha)
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: colour profiles converted to sRGB (in_srgb), transparency composited on white,
    16-bit scaled to 8-bit, CMYK/gray/palette converted (Pillow's own conversions where there is no profile)."""
    img = in_srgb(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img.convert("F") if img.mode == "F" else img.convert("I"), dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)  # float TIFFs with holes in them
        if img.mode.startswith("I;16") or a.max() > 255:  # 16-bit data: 65535 -> 255
            a = a / 257.0
        elif img.mode == "F" and a.max() <= 1.0:          # float images in [0, 1]
            a = a * 255.0
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:  # palette/tRNS transparency
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        background.alpha_composite(img.convert("RGBA"))
        img = background
    return img.convert("RGB")


def open_image(path: str, min_side: int = 0) -> Image.Image:
    """Image.open; with min_side, a JPEG past Pillow's decompression-bomb limit (a stitched panorama, a scan)
    is opened anyway: load_image decodes it at a reduced scale (a 190 MP one at 1/8 for a 32 px bucket)."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as e:
        if not min_side:
            raise
        try:
            return JpegImagePlugin.JpegImageFile(path)  # JPEG's own opener: the size is not checked
        except Exception:
            raise e from None


def load_image(path: str, min_side: int = 0) -> Image.Image:
    """An RGB image with its EXIF orientation applied; Skip for files that cannot be decoded.

    min_side > 0 lets a JPEG decode at a reduced DCT scale (1/2, 1/4, 1/8) as long as both sides stay
    >= min_side: a 12 MP photo for a 448 px bucket decodes and resizes 2.6x faster, and the Lanczos
    resize after it still shrinks by 2x or more when min_side is twice the largest bucket side.
    """
    try:
        if os.path.getsize(path) == 0:
            raise Skip("unreadable", "empty file (0 bytes)")
        with open_image(path, min_side) as img:
            if min_side and img.format in ("JPEG", "MPO"):  # MPO: phone JPEGs with a depth map or gain map
                img.draft(img.mode, (min_side, min_side))
            img.load()  # decode now, so a truncated file fails here
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except Skip:
        raise
    except Exception as e:  # UnidentifiedImageError, truncated data, decompression bombs, bad EXIF
        if isinstance(e, OSError) and e.errno is not None:  # no permission, deleted meanwhile: not its content
            raise Skip("not accessible", f"cannot read it ({e.strerror})") from None
        raise Skip("unreadable", f"cannot decode image ({type(e).__name__}: {str(e)[:100]})") from None


def caption_path_for(image_path: str):
    """stem.txt or stem.caption beside the image (also in capitals: STEM.TXT from some cameras/tools)."""
    stem = os.path.splitext(image_path)[0]
    for ext in CAPTION_EXTS + tuple(e.upper() for e in CAPTION_EXTS):
        if os.path.isfile(stem + ext):
            return stem + ext
    return None


ZERO_WIDTH = "\u00ad\u200b\u2060\ufeff"  # soft hyphen, zero-width space, word joiner, stray BOM


def decode_text(raw: bytes, name: str) -> str:
    """Caption bytes -> str: UTF-8 (a BOM allowed), UTF-16 or UTF-32 with a BOM, or UTF-16 without one
    (Windows tools write it; its NUL bytes give it away). Skip("caption not UTF-8") otherwise."""
    if raw.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):  # before UTF-16: FF FE starts both
        encoding = "utf-32"
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    elif len(raw) % 2 == 0 and max(raw[1::2].count(0), raw[::2].count(0)) >= max(1, len(raw) // 4):
        # no BOM, but zero bytes in many odd (LE) or even (BE) places: mostly-ASCII UTF-16
        encoding = "utf-16-le" if raw[1::2].count(0) >= raw[::2].count(0) else "utf-16-be"
    else:
        encoding = "utf-8-sig"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise Skip("caption not UTF-8", f"{name} is not {'UTF-8' if encoding == 'utf-8-sig' else encoding.upper()} "
                   f"(bad byte at {e.start})") from None


def clean_caption(text: str) -> str:
    """Control characters (NUL, escape codes), unpaired surrogates and zero-width characters dropped,
    whitespace collapsed to single spaces."""
    kept = (c for c in text if c.isspace() or (unicodedata.category(c) not in ("Cc", "Cs") and c not in ZERO_WIDTH))
    return " ".join("".join(kept).split())


@functools.lru_cache(maxsize=64)
def _metadata_table(path: str, stamp: str) -> tuple:
    """({file_name (POSIX, relative to the file's folder, NFC): caption}, None) of a metadata.jsonl /
    metadata.csv, or ({}, what is wrong with it: unreadable, no file_name or caption column) (cached too: a
    broken file is read once), or (the rows read, the JSONL lines that are no JSON object). stamp (size and
    mtime) is part of the cache key, so an edited file is read again. Column names are matched case-blind;
    an unquoted comma in a CSV's last column (a.png,a red flower, in a garden) stays in the caption; a null
    caption is an empty one."""
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            text = decode_text(f.read(), name).replace("\r\n", "\n")
    except OSError as e:
        return {}, f"{name} cannot be read ({e.strerror})"
    except Skip as e:
        return {}, str(e)
    bad = []  # numbers of the lines that are no JSON object: named for the images with no caption found
    if path.endswith(".jsonl"):
        rows = []
        for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may stand in a caption
            try:
                rows.append(json.loads(line))
            except ValueError:  # a bad line costs its own image's caption, not the file's
                if line.strip():
                    bad.append(number)
                continue
            if not isinstance(rows[-1], dict):
                bad.append(number)
    else:
        csv.field_size_limit(2 ** 31 - 1)  # one long caption must not cost the whole file
        header = text.split("\n", 1)[0]
        delimiter = max(",;\t", key=header.count)  # the header's: Excel in many locales writes ";"
        try:
            reader = csv.DictReader(io.StringIO(text), delimiter=delimiter, restkey="\0rest")
            rows = list(reader)
        except csv.Error as e:
            return {}, f"{name} is not a readable CSV ({e})"
        last = (reader.fieldnames or [""])[-1]
        for row in rows:
            if row.get("\0rest") and isinstance(row.get(last), str):
                row[last] = delimiter.join([row[last]] + row.pop("\0rest"))
    table, columns = {}, {}  # columns: every row's, in order (named when file_name or the caption is not one)
    for row in rows:
        if not isinstance(row, dict):
            continue
        row = {str(k).strip().lower(): v for k, v in row.items() if k is not None}
        columns.update(dict.fromkeys(row))
        file_name = row.get("file_name")
        captions = [str(row[c]) for c in CAPTION_COLUMNS if isinstance(row.get(c), (str, int, float))]
        if not captions and any(row.get(c, 0) is None for c in CAPTION_COLUMNS):
            captions = [""]  # "text": null, as an empty cell: an empty caption, not a missing entry
        if isinstance(file_name, str) and captions:
            key = unicodedata.normalize("NFC", os.path.normpath(file_name.replace("\\", "/")).replace(os.sep, "/"))
            table[key] = next((c for c in captions if c.strip()), captions[0])  # the first non-blank one
    if columns and not table and ("file_name" not in columns or not columns.keys() & set(CAPTION_COLUMNS)):
        return table, (f"{name} has no {'file_name' if 'file_name' not in columns else ' or '.join(CAPTION_COLUMNS)}"
                       f" column, only {', '.join(list(columns)[:8])}")
    if bad:
        return table, (f"{name} line {bad[0]} is not a JSON object" if len(bad) == 1 else
                       f"{name} lines {', '.join(map(str, bad[:3]))}{', ...' if len(bad) > 3 else ''} are not "
                       "JSON objects")
    return table, None


def metadata_caption(image_path: str, root: str = None):
    """(metadata file, caption, problem) from a Hugging Face imagefolder metadata.jsonl / metadata.csv
    (columns file_name and text, caption or prompt) in the image's folder or a folder above it, up to root
    (the data folder; None: up to the filesystem's root). (None, None, problem) if there is none; problem
    names a metadata file on the way that could not be read (else None). A file none of whose rows could
    be read (not UTF-8, no file_name column, ...) makes it a MetadataProblem: preprocess keeps what it
    cached from that file's images until it is fixed."""
    folder, rel = os.path.split(os.path.abspath(image_path))
    rel = unicodedata.normalize("NFC", rel)  # macOS names are NFD, a metadata file typed elsewhere NFC
    top = os.path.abspath(root) if root else None
    problem = None
    while True:
        for name in METADATA_FILES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                st = os.stat(path)
                table, wrong = _metadata_table(path, f"{st.st_size}:{st.st_mtime_ns}")
                if wrong and not problem:
                    problem = MetadataProblem(wrong) if not table else wrong
                if rel in table:
                    return path, clean_caption(table[rel]), None
        parent, name = os.path.split(folder)
        if parent == folder or folder == top:
            return None, None, problem
        folder, rel = parent, f"{unicodedata.normalize('NFC', name)}/{rel}"


def read_caption(image_path: str, root: str = None) -> str:
    """The caption of an image, cleaned (clean_caption); Skip if missing, empty or undecodable.

    From stem.txt / stem.caption beside it, else from a metadata.jsonl / metadata.csv (Hugging Face
    imagefolder layout; looked for up to root). UTF-8, UTF-16 and UTF-32 are read (decode_text).
    """
    path = caption_path_for(image_path)
    if path is None:
        meta, text, problem = metadata_caption(image_path, root)
        if meta is None:
            raise Skip("metadata unreadable" if isinstance(problem, MetadataProblem) else "missing caption",
                       f"no {' or '.join(CAPTION_EXTS)} caption file beside it and no entry in a "
                       f"{' or '.join(METADATA_FILES)}" + (f" ({problem})" if problem else ""))
        if not text:
            raise Skip("empty caption", f"its caption in {os.path.basename(meta)} is empty")
        return text
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise Skip("not accessible", f"cannot read caption {os.path.basename(path)} ({e.strerror})") from None
    text = clean_caption(decode_text(raw, f"caption {os.path.basename(path)}"))
    if not text:
        raise Skip("empty caption", f"caption {os.path.basename(path)} is empty")
    return text


def find_images(data_dir: str, skip_dirs=(), unlisted: list = None) -> list:
    """Relative POSIX paths of all images under data_dir (sorted; hidden folders and skip_dirs left out).
    Images in other formats (OTHER_IMAGE_EXTS) are counted in one warning. Folders that cannot be listed
    and links (without an extension) to what is not there, a folder on a drive not mounted, are named in a
    warning each and appended to unlisted (relative POSIX paths), if given: preprocess keeps what it
    cached from them."""
    found, others = [], []
    skip = {os.path.abspath(d) for d in skip_dirs}  # the cache, the runs (their sample grids): not data
    seen = {os.path.realpath(data_dir)}  # linked folders are followed once: a link back up is no loop

    def left_out(path, why):  # say so: its images would silently be missing
        print(f"warning: {path}: {why} - left out (what the cache holds from it is kept)", file=sys.stderr)
        if unlisted is not None:
            unlisted.append(os.path.relpath(path, data_dir).replace(os.sep, "/"))

    def unreadable(e):  # a folder that cannot be listed
        left_out(e.filename, f"cannot list this folder ({e.strerror})")

    for root, dirs, files in os.walk(data_dir, followlinks=True, onerror=unreadable):
        keep = []
        for d in sorted(dirs):
            path = os.path.join(root, d)
            if d.startswith(".") or os.path.abspath(path) in skip or os.path.realpath(path) in seen:
                continue
            seen.add(os.path.realpath(path))
            keep.append(d)
        dirs[:] = keep
        for name in files:
            path = os.path.join(root, name)
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTS + OTHER_IMAGE_EXTS):  # (a dangling link to one: preprocess says so)
                rel = os.path.relpath(path, data_dir).replace(os.sep, "/")
                (found if name.lower().endswith(IMAGE_EXTS) else others).append(rel)
            elif "." not in name and os.path.islink(path) and not os.path.exists(path):  # (no stat per caption)
                left_out(path, f"a link to {os.readlink(path)}, which is not there (a drive not mounted?)")
    if others:
        formats = sorted({os.path.splitext(o)[1].lower() for o in others})
        print(f"warning: data_dir={data_dir}: {len(others)} image(s) in a format preprocess does not read are left "
              f"out ({', '.join(formats)}; e.g. {min(others)}): convert them to png, jpg or webp", file=sys.stderr)
    return sorted(found)
