"""Fuzz drill: the data readers (CSV/TSV, JSON lines, COCO, folder, WebDataset) on generated files.

Property: reading any file gives records that keep the record contract, or a documented error (a CmalignError,
for a malformed file a DataSchemaError naming the file, and the row where a row is to blame); never another
exception, never a hang. Hypothesis profiles and the hang guard: tests/helpers/fuzz.py.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import tarfile
import tempfile
from pathlib import Path

import pytest
from helpers.fuzz import check_documented, examples, json_values, mostly, mutated, no_hang
from hypothesis import event, example, given
from hypothesis import strategies as st
from PIL import Image

from cmalign.data.options import FORMATS, ReaderOptions
from cmalign.data.readers import TarMember, read_dataset
from cmalign.data.records import BadSample, DataSchemaError, ReadResult, Record, load_image
from cmalign.errors import CmalignError, ConfigError, MissingInputError

BOM = "\ufeff".encode()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()

# -- what comes back ------------------------------------------------------------------------------------------


def check_result(result: ReadResult, where: str) -> None:
    """The record contract (cmalign.data.records): what every reader promises about what it returns."""
    assert isinstance(result, ReadResult) and result.records, "read_dataset returns records or raises"
    for r in result.records:
        assert isinstance(r, Record)
        assert isinstance(r.caption, str) and r.caption and r.caption == r.caption.strip(), r
        assert r.label is None or (isinstance(r.label, str) and r.label and r.label == r.label.strip()), r
        if isinstance(r.image, str):
            assert os.path.isabs(r.image), r
        else:
            assert isinstance(r.image, TarMember) and r.image.size >= 0 and r.image.offset >= 0, r
        assert isinstance(r.key, str) and r.key, r
        assert isinstance(r.source, str) and where in r.source, r
    for b in result.skipped:
        assert isinstance(b, BadSample) and all(isinstance(v, str) for v in b.to_dict().values()), b
    assert pickle.loads(pickle.dumps(result.records)) == result.records  # DataLoader workers get them pickled


def read_or_documented(path: Path, options: ReaderOptions | None = None, check_files: bool = True,
                       row_expected: bool = False, names: Path | None = None) -> ReadResult | None:
    """read_dataset's records (checked), or None after a documented error naming ``names`` (default: ``path``;
    the error names the shard or caption file to blame, inside ``names``)."""
    names = names or path
    try:
        with no_hang():
            result = read_dataset(path, options, check_files=check_files)
    except CmalignError as e:
        event(f"error: {type(e).__name__}")
        check_documented(e, names=str(names))
        if isinstance(e, DataSchemaError):
            assert str(names) in str(e.file), e
            if row_expected and not e.problem.startswith("no usable samples"):
                assert e.row is not None, f"a problem within the file names no row: {e}"
        return None
    event("records")
    check_result(result, str(names))
    return result


# -- strategies ------------------------------------------------------------------------------------------------

# What tends to break JSON readers on top of well-formed values: numbers past Python's int-digit limit, nesting
# past the recursion limit, and lines that are not JSON at all.
nasty_json = st.sampled_from([
    "1" * 5000, "-" + "9" * 4400, "1e999999", "[" * 50000 + "]" * 50000, "{\"a\":" * 30000 + "1" + "}" * 30000,
    "[" * 100000, "NaN", "-Infinity", "\"\\ud800\"", "\"\\u0000\"", "", "nul", "{\"filepath\": }",
])
names = st.sampled_from(["filepath", "title", "image", "caption", "label", "category", "id", ""]) | st.text(max_size=6)
image_paths = st.sampled_from(["a.png", "sub/b.png", "missing.png", "", "  ", "/abs/none.png", "../a.png", "~/x.png",
                               "a.png\x00", "\ud800.png", "a" * 300 + ".png", "."]) | st.text(max_size=12)
captions = st.sampled_from(["a red square", "  ", "", "\u202eRTL", "e\u0301", "🐱" * 5, "x" * 3000]) | st.text()


good_paths = st.sampled_from(["a.png", "sub/b.png", "./a.png", " a.png ", "missing.png"])
good_captions = st.sampled_from(["a red square", "two dogs, one cat", "  padded  ", "café crème", "🐱 on a mat",
                                 "line\nbreak", 'a "quoted" word', "tab\there"]) | st.text(min_size=1, max_size=30)
good_labels = st.sampled_from(["cat", " dog ", "", "3"])


@st.composite
def json_object(draw) -> object:
    """A JSON lines object: mostly the keys a reader looks for, with values of any type."""
    obj = {}
    for key in draw(st.lists(names, max_size=5)):
        obj[key] = draw(st.one_of(image_paths, captions, json_values, st.lists(captions, max_size=3)))
    return obj


# How a text file is stored: with or without a BOM, and maybe with a byte that is not UTF-8 spliced in at a
# fraction of its length.
storage = st.tuples(st.booleans(), st.none() | st.none() | st.tuples(
    st.floats(0, 1), st.sampled_from([b"\xff", b"\xe9", b"\xc3", b"\x80", b"\xed\xa0\x80"])))


def encode(text: str, how: tuple) -> bytes:
    bom, splice = how
    data = text.encode("utf-8", "surrogatepass")
    if bom:
        data = BOM + data
    if splice is not None:
        at = int(splice[0] * len(data))
        data = data[:at] + splice[1] + data[at:]
    return data


def write_images(d: Path) -> None:
    (d / "sub").mkdir(exist_ok=True)
    (d / "a.png").write_bytes(PNG)
    (d / "sub" / "b.png").write_bytes(b"not an image at all")


# -- properties ------------------------------------------------------------------------------------------------

FILE_NAMES = ["data.csv", "data.tsv", "data.jsonl", "data.json", "data.tar", "data.TXT", "data"]


@examples(1.0)
@given(name=st.sampled_from(FILE_NAMES), fmt=st.sampled_from(FORMATS),
       data=st.binary(max_size=2048) | st.sampled_from([b"", BOM, b"\x1f\x8b\x08\x00", b"\x00" * 1024]))
@example(name="data.json", fmt="auto", data=b"[" * 100000)  # RecursionError from looks_like_coco (fixed)
@example(name="data.jsonl", fmt="auto", data=b'{"filepath": 1' + b"1" * 5000 + b"}")  # int digit limit (fixed)
def test_any_bytes_in_any_file(name, fmt, data) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        read_or_documented(path, ReaderOptions(format=fmt))


@st.composite
def csv_text(draw, sep: str) -> str:
    """A CSV/TSV file: mostly a good header and rows (quoted by the csv module, or joined raw, which a separator or
    a quote inside a caption breaks), sometimes ragged rows and headers of any names."""
    header = draw(mostly(st.sampled_from([["filepath", "title"], ["filepath", "title", "label"],
                                          ["title", "extra", "filepath"], ["filepath", "filepath", "title"]]),
                         st.lists(names, max_size=5)))
    cell_of = {"filepath": mostly(good_paths, image_paths), "title": mostly(good_captions, captions),
               "label": mostly(good_labels, captions)}
    any_cell = st.one_of(image_paths, captions, st.text(alphabet=',\t"\n\r x\x00', max_size=8))
    rows = draw(st.lists(mostly(st.tuples(*[cell_of.get(c, st.text(max_size=5)) for c in header]).map(list),
                                st.lists(any_cell, max_size=6), one_in=8), max_size=6))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    if draw(st.booleans()):
        buf = io.StringIO()
        csv.writer(buf, delimiter=sep, lineterminator=newline).writerows([header, *rows])
        return buf.getvalue()
    return newline.join(sep.join(r) for r in [header, *rows])


@examples(1.0)
@given(data=st.data(), sep=st.sampled_from(["\t", ","]), option_sep=st.sampled_from([None, None, None, ",", "\t", ";"]),
       check_files=st.booleans(), tsv=st.booleans(), how=mostly(st.just((False, None)), storage, one_in=3))
def test_csv_rows(data, sep, option_sep, check_files, tsv, how) -> None:
    text = data.draw(csv_text(sep), label="file")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_images(d)
        path = d / ("data.tsv" if tsv else "data.csv")
        path.write_bytes(encode(text, how))
        read_or_documented(path, ReaderOptions(csv_separator=option_sep), check_files, row_expected=True)


good_object = st.one_of(
    st.fixed_dictionaries({"filepath": good_paths, "title": good_captions | st.lists(good_captions, max_size=3)},
                          optional={"label": good_labels | st.integers(), "extra": json_values}),
    st.fixed_dictionaries({"image": good_paths, "caption": good_captions}, optional={"category": good_labels}),
)


@examples(1.0)
@given(data=st.data(), check_files=st.booleans(), ext=st.sampled_from(["data.jsonl", "data.json"]),
       how=mostly(st.just((False, None)), storage, one_in=3))
def test_jsonl_lines(data, check_files, ext, how) -> None:
    bad_line = st.one_of(json_object().map(lambda o: json.dumps(o)), json_values.map(json.dumps), nasty_json,
                         st.text(max_size=30))
    line = mostly(good_object.map(json.dumps), bad_line, one_in=6)
    lines = data.draw(st.lists(line, max_size=6))
    text = "\n".join(lines)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_images(d)
        path = d / ext
        path.write_bytes(encode(text, how))
        label = data.draw(st.sampled_from(["label", "label", "category", "title"]))
        read_or_documented(path, ReaderOptions(format="jsonl", label_column=label), check_files, row_expected=True)


@st.composite
def good_coco(draw) -> dict:
    n = draw(st.integers(1, 4))
    ids = draw(st.lists(st.integers(-5, 10**12) | st.text(max_size=4), min_size=n, max_size=n, unique=True))
    images = [{"id": i, "file_name": draw(good_paths)} | draw(st.fixed_dictionaries({}, optional={
        "label": good_labels, "category": good_labels | st.integers(0, 9)})) for i in ids]
    annotations = [{"image_id": draw(st.sampled_from(ids)), "caption": draw(good_captions)}
                   for _ in range(draw(st.integers(0, 6)))]
    return {"images": images, "annotations": annotations, "info": {"year": 2014}}


@st.composite
def coco_document(draw) -> object:
    ids = st.one_of(st.integers(-3, 3), st.sampled_from(["1", "x", None, True, 1.0, float("nan")]), json_values)

    def entry(keys):
        obj = {k: draw(st.one_of(ids if "id" in k else image_paths, captions, json_values)) for k in keys
               if draw(st.integers(0, 5))}
        return obj if draw(st.integers(0, 9)) else draw(json_values)

    images = [entry(["id", "file_name", draw(st.sampled_from(["label", "category", "x"]))])
              for _ in range(draw(st.integers(0, 4)))]
    annotations = [entry(["image_id", "caption"]) for _ in range(draw(st.integers(0, 5)))]
    doc = {"images": images, "annotations": annotations}
    for key in draw(st.lists(st.sampled_from(["images", "annotations"]), max_size=2)):
        doc[key] = draw(json_values)  # the wrong type for a top-level list
    return doc


@examples(1.0)
@given(doc=st.one_of(good_coco(), good_coco().flatmap(mutated), coco_document()), check_files=st.booleans(),
       fmt=st.sampled_from(["coco", "auto"]), how=mostly(st.just((False, None)), storage, one_in=3),
       inject=mostly(st.none(), st.tuples(st.floats(0, 1), nasty_json), one_in=6))
@example(doc={"images": [{"id": [1], "file_name": "a.png"}], "annotations": []},
         check_files=True, fmt="coco", how=(False, None), inject=None).via("an unhashable image id (fixed)")
@example(doc={"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": {}, "caption": "x"}]},
         check_files=True, fmt="coco", how=(False, None), inject=None).via("an unhashable image_id (fixed)")
def test_coco_documents(doc, check_files, fmt, how, inject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_images(d)
        path = d / "captions.json"
        text = json.dumps(doc)
        if inject is not None:  # something json cannot parse, spliced in
            at = int(inject[0] * len(text))
            text = text[:at] + inject[1] + text[at:]
        path.write_bytes(encode(text, how))
        read_or_documented(path, ReaderOptions(format=fmt), check_files)


file_stems = st.sampled_from(["a", "b", "a.b", ".hidden", "sub/c", ".git/d", "x y", "é"])
folder_exts = st.sampled_from(["jpg", "PNG", "jpeg", "webp", "bmp", "txt", "label", "cls", "json", "tar", ""])
contents = st.one_of(st.binary(max_size=64), st.just(PNG), st.just(PNG[:20]), captions.map(lambda c: c.encode()),
                     st.sampled_from([b"\xff\xfe", BOM + b"caption", b"one\ntwo\n\n three", b"\r\r\n"]))


image_contents = mostly(st.just(PNG), contents, one_in=3)
caption_contents = mostly(good_captions.map(str.encode) | st.just(b"one\ntwo\n\n three"), contents, one_in=4)
pairs = st.dictionaries(file_stems, st.tuples(st.sampled_from(["jpg", "PNG", "jpeg", "webp", "bmp"]), image_contents,
                                              caption_contents), max_size=4).map(
    lambda d: {(stem, f): data for stem, (ext, img, cap) in d.items() for f, data in ((ext, img), ("txt", cap))})


@examples(0.5)
@given(files=st.tuples(pairs, st.dictionaries(st.tuples(file_stems, folder_exts), contents, max_size=4)).map(
    lambda t: t[0] | t[1]), fmt=st.sampled_from(["auto", "folder"]))
def test_folder_trees(files, fmt) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "set"
        root.mkdir()
        for (stem, ext), data in files.items():
            p = root / (f"{stem}.{ext}" if ext else stem)
            if p.exists() or any(parent.is_file() for parent in p.parents):
                continue
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        result = read_or_documented(root, ReaderOptions(format=fmt))
        # Images are decoded later (fit, embed, eval), whose loaders catch any Exception as a bad sample: a file
        # that is not an image must raise an Exception there, never hang or kill the process.
        for r in (result.records if result else [])[:4]:
            try:
                with no_hang():
                    assert load_image(r).mode == "RGB"
            except Exception:
                pass


@st.composite
def tar_shard(draw) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT]))) \
            as tf:
        for stem in draw(st.lists(st.sampled_from(["g0", "g1", "dir/g2"]), max_size=3, unique=True)):  # good ones
            caption_ext = draw(st.sampled_from(["txt", "json"]))
            caption = draw(good_captions)
            members = [(f"{stem}.{draw(st.sampled_from(['jpg', 'png', 'webp']))}", draw(image_contents)),
                       (f"{stem}.{caption_ext}", (caption if caption_ext == "txt" else json.dumps(
                           {draw(st.sampled_from(["caption", "title", "txt"])): caption, "label": draw(good_labels)})
                        ).encode())]
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        for _ in range(draw(st.integers(0, 4))):
            stem = draw(st.sampled_from(["s0", "s1", "dir/s2", "s.3", ".s4", "", "g0"]))
            ext = draw(st.sampled_from(["jpg", "png", "txt", "json", "cls", "label", "JPG", "txt.gz", ""]))
            name = f"{stem}.{ext}" if ext else stem
            if ext == "json":
                data = draw(st.one_of(json_object().map(json.dumps), json_values.map(json.dumps), nasty_json)).encode(
                    "utf-8", "surrogatepass")
            else:
                data = draw(contents)
            info = tarfile.TarInfo(name or "x")
            info.size = len(data)
            if draw(st.integers(0, 9)) == 0:
                info.type = draw(st.sampled_from([tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE]))
                info.linkname = "s0.jpg"
                info.size = 0
                data = b""
            tf.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    damage = draw(st.integers(0, 7))
    if damage == 0:  # truncated
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif damage == 1 and raw:  # bytes overwritten (headers included)
        at = draw(st.integers(0, len(raw) - 1))
        patch = draw(st.binary(min_size=1, max_size=16))
        raw = raw[:at] + patch + raw[at + len(patch):]
    return raw


@examples(1.0)
@given(shards=st.lists(tar_shard(), min_size=1, max_size=3), layout=st.sampled_from(["file", "dir", "braces"]),
       caption_column=st.sampled_from(["caption", "title", "txt"]), label_column=st.sampled_from(["label", "cls"]))
@example(shards=[b""], layout="file", caption_column="caption", label_column="label")
def test_webdataset_shards(shards, layout, caption_column, label_column) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "wds"
        d.mkdir()
        for i, raw in enumerate(shards):
            (d / f"shard-{i:02d}.tar").write_bytes(raw)
        path = {"file": d / "shard-00.tar", "dir": d, "braces": d / f"shard-{{00..{len(shards) - 1:02d}}}.tar"}[layout]
        options = ReaderOptions(format="webdataset" if layout == "braces" and len(shards) == 1 else "auto",
                                caption_column=caption_column, label_column=label_column)
        result = read_or_documented(path, options, names=d)
        for r in (result.records if result else [])[:4]:  # decoding a member: any Exception, as for folders
            try:
                with no_hang():
                    load_image(r)
            except Exception:
                pass


@examples(0.5)
@given(fmt=st.text(max_size=12) | st.sampled_from(FORMATS), sep=st.none() | st.text(max_size=3),
       image_column=names, caption_column=names, label_column=names,
       image_root=st.sampled_from([None, None, ".", "sub", "missing", "a.png", ""]), check_files=st.booleans())
def test_reader_options(fmt, sep, image_column, caption_column, label_column, image_root, check_files) -> None:
    """Any option values: a ConfigError when the constructor refuses them, else the reader copes."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_images(d)
        root = str(d / image_root) if image_root else image_root
        try:
            options = ReaderOptions(format=fmt, csv_separator=sep, image_column=image_column,
                                    caption_column=caption_column, label_column=label_column, image_root=root)
        except ConfigError:
            assert fmt not in FORMATS or (sep is not None and len(sep) != 1)
            return
        path = d / "data.csv"
        path.write_text(f"{image_column}\t{caption_column}\t{label_column}\na.png\ta caption\tcls\n", encoding="utf-8")
        try:
            read_or_documented(path, options, check_files)
        except AssertionError:  # a bad image_root is named as the image_root, not as the data file
            with pytest.raises(MissingInputError, match="image_root"):
                read_dataset(path, options, check_files=check_files)
            assert image_root in ("missing", "a.png", "")


@pytest.mark.parametrize("text", [
    '{"filepath": "a.png", "title": 1' + "1" * 5000 + "}",  # past Python's int-digit limit: ValueError leaked
    '{"filepath": "a.png", "title": "x", "label": ' + "[" * 100000 + "}",  # RecursionError leaked
    "[" * 100000,
])
def test_jsonl_lines_json_cannot_parse_name_file_and_row(tmp_path: Path, text: str) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    path = tmp_path / "data.jsonl"
    path.write_text('{"filepath": "a.png", "title": "fine"}\n' + text + "\n", encoding="utf-8")
    with pytest.raises(DataSchemaError, match=r"data\.jsonl, row 2: invalid JSON"):
        read_dataset(path)


def test_coco_unhashable_ids_are_schema_errors(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": [{"id": [1], "file_name": "a.png"}], "annotations": []}))
    with pytest.raises(DataSchemaError, match=r"captions\.json, row images\[0\], field 'id': expected"):
        read_dataset(path)
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                "annotations": [{"image_id": {"a": 1}, "caption": "x"}]}))
    with pytest.raises(DataSchemaError, match=r"row annotations\[0\], field 'image_id': expected"):
        read_dataset(path)


def test_coco_json_cannot_parse_is_named(tmp_path: Path) -> None:
    path = tmp_path / "captions.json"
    path.write_text('{"images": [], "annotations": [' + "[" * 100000)
    with pytest.raises(DataSchemaError, match=r"captions\.json"):
        read_dataset(path, ReaderOptions(format="coco"))
    with pytest.raises(DataSchemaError, match=r"captions\.json"):
        read_dataset(path)  # auto: looks_like_coco must not leak the RecursionError either


def test_webdataset_json_cannot_parse_skips_the_sample(tmp_path: Path) -> None:
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in (("a.jpg", PNG), ("a.json", b'{"caption": 1' + b"1" * 5000 + b"}"),
                           ("b.jpg", PNG), ("b.json", b"[" * 100000), ("c.jpg", PNG), ("c.txt", b"fine")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    result = read_dataset(path)
    assert [r.caption for r in result.records] == ["fine"]
    assert sorted(b.source.rsplit("::", 1)[1] for b in result.skipped) == ["a", "b"]
