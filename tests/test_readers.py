"""Reading user data sets: every format, the per-sample/schema split, and picklable records."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from cmalign.data.options import ReaderOptions
from cmalign.data.readers import TarMember, detect_format, expand_braces, read_dataset
from cmalign.data.records import DataSchemaError, Record, load_image
from cmalign.errors import ConfigError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def make_image(path: Path, size: tuple[int, int] = (8, 6), color: tuple[int, int, int] = RED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def image_bytes(size: tuple[int, int], color: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


# --- CSV / TSV ----------------------------------------------------------------------------------


def test_csv_comma_with_quoted_captions_and_relative_paths(tmp_path: Path) -> None:
    make_image(tmp_path / "img" / "a.png")
    make_image(tmp_path / "img" / "b.jpg")
    csv_file = tmp_path / "train.csv"
    csv_file.write_text(
        'filepath,title\nimg/a.png,"a dog, a cat, and a ""bird"""\nimg/b.jpg,plain caption\n',
        encoding="utf-8",
    )
    result = read_dataset(csv_file)
    assert [r.caption for r in result.records] == ['a dog, a cat, and a "bird"', "plain caption"]
    first = result.records[0]
    assert first.image == str(tmp_path / "img" / "a.png")  # resolved against the CSV's directory
    assert first.key == first.image
    assert first.source == f"{csv_file}:2"
    assert first.label is None
    assert result.skipped == []
    assert load_image(first).size == (8, 6)


def test_tsv_is_open_clip_default_and_label_column_is_carried(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    tsv = tmp_path / "train.tsv"
    # Commas inside an unquoted caption must not split it: .tsv means tab.
    tsv.write_text("filepath\ttitle\tlabel\na.png\ta red, square thing\tsquare\nb.png\tanother\t\n")
    result = read_dataset(tsv)
    assert [(r.caption, r.label) for r in result.records] == [
        ("a red, square thing", "square"),
        ("another", None),  # empty label cell → None
    ]


def test_csv_extension_with_tab_separated_content_is_sniffed(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    f = tmp_path / "open_clip_style.csv"
    f.write_text("filepath\ttitle\na.png\tone, two, three\n")
    result = read_dataset(f)
    assert result.records[0].caption == "one, two, three"


def test_custom_columns_separator_and_image_root(tmp_path: Path) -> None:
    images = tmp_path / "elsewhere"
    make_image(images / "x.png")
    f = tmp_path / "meta" / "data.csv"
    f.parent.mkdir()
    f.write_text("path;text\nx.png;caption here\n")
    result = read_dataset(
        f, ReaderOptions(csv_separator=";", image_column="path", caption_column="text", image_root=str(images))
    )
    assert result.records[0].image == str(images / "x.png")
    assert result.records[0].caption == "caption here"


def test_csv_missing_column_names_file_row_and_field(tmp_path: Path) -> None:
    f = tmp_path / "bad.csv"
    f.write_text("filepath,caption\na.png,hello\n")
    with pytest.raises(DataSchemaError) as err:
        read_dataset(f)
    assert (err.value.file, err.value.row, err.value.field) == (str(f), 1, "title")
    assert "'caption'" in err.value.problem  # lists what was found
    assert str(f) in str(err.value) and "row 1" in str(err.value)


def test_csv_wrong_field_count_names_the_row(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    f = tmp_path / "bad.csv"
    f.write_text("filepath,title\na.png,fine\na.png,unquoted, comma\n")
    with pytest.raises(DataSchemaError) as err:
        read_dataset(f)
    assert err.value.row == 3
    assert "expected 2 fields, found 3" in err.value.problem


def test_csv_row_number_is_the_line_a_multiline_caption_starts_on(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    f = tmp_path / "multi.csv"
    f.write_text('filepath,title\na.png,"line one\nline two"\na.png,x,y\n')
    with pytest.raises(DataSchemaError) as err:
        read_dataset(f)
    assert err.value.row == 4


def test_empty_caption_and_missing_image_are_skipped_not_raised(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    f = tmp_path / "d.csv"
    f.write_text("filepath,title\na.png,good\na.png,   \nmissing.png,has caption\n")
    result = read_dataset(f)
    assert [r.caption for r in result.records] == ["good"]
    by_source = {b.source: b for b in result.skipped}
    assert set(by_source) == {f"{f}:3", f"{f}:4"}
    assert by_source[f"{f}:3"].field == "caption"
    assert by_source[f"{f}:4"].field == "image"
    assert by_source[f"{f}:4"].reason == f"file not found: {tmp_path / 'missing.png'}"


def test_check_files_false_keeps_missing_images(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    f = tmp_path / "d.csv"
    f.write_text("filepath,title\na.png,good\nmissing.png,kept\n")
    result = read_dataset(f, check_files=False)
    assert [r.caption for r in result.records] == ["good", "kept"]


# --- JSON lines ---------------------------------------------------------------------------------


def test_jsonl_happy_path_with_aliases_and_blank_lines(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png", color=BLUE)
    f = tmp_path / "d.jsonl"
    lines = [
        json.dumps({"filepath": "a.png", "title": "first", "label": "cat"}),
        "",
        json.dumps({"image": "b.png", "caption": ["second", "third"]}),  # aliases, two captions
    ]
    f.write_text("\n".join(lines) + "\n")
    result = read_dataset(f)
    assert [(r.caption, r.label, r.source) for r in result.records] == [
        ("first", "cat", f"{f}:1"),
        ("second", None, f"{f}:3"),
        ("third", None, f"{f}:3"),
    ]
    assert result.records[1].key == result.records[2].key == str(tmp_path / "b.png")


def test_jsonl_bad_json_line_reports_line_number(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    f = tmp_path / "d.jsonl"
    f.write_text('{"filepath": "a.png", "title": "ok"}\n{"filepath": "a.png", "title": \n')
    with pytest.raises(DataSchemaError) as err:
        read_dataset(f)
    assert (err.value.file, err.value.row) == (str(f), 2)
    assert "invalid JSON" in err.value.problem


def test_jsonl_missing_key_names_field(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"filepath": "a.png"}\n')
    with pytest.raises(DataSchemaError) as err:
        read_dataset(f)
    assert (err.value.row, err.value.field) == (1, "title")


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('["a.png", "caption"]\n')
    with pytest.raises(DataSchemaError, match="expected a JSON object") as err:
        read_dataset(f)
    assert err.value.row == 1


# --- COCO ---------------------------------------------------------------------------------------


def coco_file(tmp_path: Path, annotations: list[dict]) -> Path:
    make_image(tmp_path / "images" / "1.jpg", size=(5, 4))
    make_image(tmp_path / "images" / "2.jpg", size=(3, 3))
    data = {
        "images": [
            {"id": 1, "file_name": "1.jpg", "category": "dog"},
            {"id": 2, "file_name": "2.jpg"},
        ],
        "annotations": annotations,
    }
    f = tmp_path / "annotations" / "captions.json"
    f.parent.mkdir()
    f.write_text(json.dumps(data))
    return f


def test_coco_two_captions_per_image_share_key(tmp_path: Path) -> None:
    f = coco_file(
        tmp_path,
        [
            {"id": 10, "image_id": 1, "caption": "a dog"},
            {"id": 11, "image_id": 2, "caption": "a square"},
            {"id": 12, "image_id": 1, "caption": "a brown dog"},
        ],
    )
    assert detect_format(str(f)) == "coco"
    result = read_dataset(f, ReaderOptions(image_root=str(tmp_path / "images")))
    dog = [r for r in result.records if r.image == str(tmp_path / "images" / "1.jpg")]
    assert [r.caption for r in dog] == ["a dog", "a brown dog"]
    assert dog[0].key == dog[1].key
    assert {r.label for r in dog} == {"dog"}
    assert dog[1].source == f"{f}:annotation 2"
    assert len(result.records) == 3 and result.skipped == []


def test_coco_defaults_to_json_directory_for_images(tmp_path: Path) -> None:
    f = coco_file(tmp_path, [{"image_id": 1, "caption": "a dog"}])
    # Images are not beside the JSON: every sample is skipped, and the error suggests image_root.
    with pytest.raises(DataSchemaError, match="image_root"):
        read_dataset(f)
    result = read_dataset(f, check_files=False)
    assert result.records[0].image == str(f.parent / "1.jpg")


def test_coco_unknown_image_id_names_annotation_and_field(tmp_path: Path) -> None:
    f = coco_file(tmp_path, [{"image_id": 1, "caption": "ok"}, {"image_id": 99, "caption": "orphan"}])
    with pytest.raises(DataSchemaError) as err:
        read_dataset(f, ReaderOptions(image_root=str(tmp_path / "images")))
    assert (err.value.row, err.value.field) == ("annotations[1]", "image_id")
    assert "99" in err.value.problem


# --- folder of pairs ----------------------------------------------------------------------------


def test_folder_pairs_multiline_txt_label_and_missing_txt(tmp_path: Path) -> None:
    root = tmp_path / "pairs"
    make_image(root / "one.jpg", color=GREEN)
    (root / "one.txt").write_text("  a green square \n")
    (root / "one.label").write_text("square\n")
    make_image(root / "two.png")
    (root / "two.txt").write_text("first caption\n\nsecond caption\n")
    make_image(root / "three.webp")  # no three.txt
    (root / "notes.md").write_text("ignored")

    assert detect_format(str(root)) == "folder"
    result = read_dataset(root)
    captions = {(r.caption, r.label, os.path.basename(r.image)) for r in result.records}
    assert captions == {
        ("a green square", "square", "one.jpg"),
        ("first caption", None, "two.png"),
        ("second caption", None, "two.png"),
    }
    two = [r for r in result.records if r.image.endswith("two.png")]
    assert two[0].key == two[1].key
    one = next(r for r in result.records if r.image.endswith("one.jpg"))
    assert one.source == str(root / "one.txt")
    r, g, b = load_image(one).getpixel((0, 0))
    assert g > 200 and r < 50 and b < 50  # JPEG is lossy
    [bad] = result.skipped
    assert bad.field == "caption"
    assert bad.reason == "no three.txt beside three.webp"


# --- WebDataset ---------------------------------------------------------------------------------


def write_shards(shard_dir: Path) -> list[Path]:
    """Two shards of two samples each; the first sample of shard 1 lacks a caption."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    samples = [
        [
            {"__key__": "s000", "png": image_bytes((4, 3), RED), "txt": "red", "cls": "warm"},
            {"__key__": "s001", "jpg": image_bytes((6, 5), BLUE, "JPEG"), "txt": "blue"},
        ],
        [
            {"__key__": "s002", "png": image_bytes((2, 7), GREEN)},  # no caption
            {"__key__": "s003", "png": image_bytes((3, 3), RED), "json": json.dumps({"caption": "json"})},
        ],
    ]
    paths = []
    for i, shard in enumerate(samples):
        path = shard_dir / f"train-{i:04d}.tar"
        try:
            import webdataset as wds

            with wds.TarWriter(str(path)) as sink:
                for sample in shard:
                    sink.write(sample)
        except ImportError:
            with tarfile.open(path, "w") as tf:
                for sample in shard:
                    for ext, value in sample.items():
                        if ext == "__key__":
                            continue
                        data = value.encode() if isinstance(value, str) else value
                        info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                        info.size = len(data)
                        tf.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def check_shard_records(records: list[Record], shard_dir: Path) -> None:
    by_caption = {r.caption: r for r in records}
    assert set(by_caption) == {"red", "blue", "json"}
    red = by_caption["red"]
    assert isinstance(red.image, TarMember)
    assert red.label == "warm"
    shard0 = str(shard_dir / "train-0000.tar")
    assert red.key == f"{shard0}::s000"
    assert red.source.endswith("train-0000.tar::s000")
    assert load_image(red).size == (4, 3)
    assert load_image(red).getpixel((1, 1)) == RED
    blue = load_image(by_caption["blue"])
    assert blue.size == (6, 5)
    r, g, b = blue.getpixel((2, 2))
    assert b > 200 and r < 50 and g < 50  # JPEG is lossy
    assert load_image(by_caption["json"]).size == (3, 3)


def test_webdataset_directory_single_tar_and_brace_pattern(tmp_path: Path) -> None:
    shard_dir = tmp_path / "shards"
    paths = write_shards(shard_dir)

    assert detect_format(str(shard_dir)) == "webdataset"
    from_dir = read_dataset(shard_dir)
    check_shard_records(from_dir.records, shard_dir)
    [bad] = from_dir.skipped
    assert (bad.field, bad.source) == ("caption", f"{paths[1]}::s002")

    single = read_dataset(paths[0])
    assert sorted(r.caption for r in single.records) == ["blue", "red"]
    assert single.skipped == []

    pattern = str(shard_dir / "train-{0000..0001}.tar")
    from_braces = read_dataset(pattern)
    check_shard_records(from_braces.records, shard_dir)
    assert from_braces.records == from_dir.records


def test_webdataset_brace_pattern_with_missing_shard(tmp_path: Path) -> None:
    write_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="train-0002.tar"):
        read_dataset(str(tmp_path / "train-{0000..0002}.tar"))


def test_expand_braces() -> None:
    assert expand_braces("a-{0000..0002}.tar") == ["a-0000.tar", "a-0001.tar", "a-0002.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("{a,{b,c}}") == ["a", "b", "c"]
    assert expand_braces("plain.tar") == ["plain.tar"]


# --- cross-cutting ------------------------------------------------------------------------------


def test_records_are_picklable_for_dataloader_workers(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png", color=BLUE)
    f = tmp_path / "d.csv"
    f.write_text("filepath,title,label\na.png,hello,x\n")
    records = read_dataset(f).records + read_dataset(write_shards(tmp_path / "shards")[0]).records
    restored = pickle.loads(pickle.dumps(records))
    assert restored == records
    for before, after in zip(records, restored, strict=False):
        assert load_image(after).tobytes() == load_image(before).tobytes()


def test_empty_dataset_raises_with_reasons(tmp_path: Path) -> None:
    f = tmp_path / "d.csv"
    f.write_text("filepath,title\nmissing.png,caption\n")
    with pytest.raises(DataSchemaError, match=r"no usable samples \(1 skipped: .*file not found"):
        read_dataset(f)
    header_only = tmp_path / "h.csv"
    header_only.write_text("filepath,title\n")
    with pytest.raises(DataSchemaError, match="no usable samples"):
        read_dataset(header_only)


def test_missing_path_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_dataset(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="webdataset"):
        read_dataset(tmp_path, ReaderOptions(format="parquet"))


def test_reader_options_are_checked_when_made_and_again_when_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="one character"):
        ReaderOptions(csv_separator=";;")
    options = ReaderOptions()
    options.format = "parquet"  # configs are mutable (fit's --set sets fields): the reader checks again
    with pytest.raises(ConfigError, match="valid formats"):
        read_dataset(tmp_path, options)


def test_fit_and_embed_configs_are_reader_options_with_flat_keys(tmp_path: Path) -> None:
    """DataConfig and EmbedConfig extend ReaderOptions (flat keys: fit's TOML and config hash stay as they were)."""
    from dataclasses import asdict, fields

    from cmalign.corpus.embed import EmbedConfig
    from cmalign.train.config import DataConfig

    names = {f.name for f in fields(ReaderOptions)}
    for cfg in (DataConfig(), EmbedConfig(export="x")):
        assert isinstance(cfg, ReaderOptions)
        assert {k: v for k, v in asdict(cfg).items() if k in names} == asdict(ReaderOptions())
    make_image(tmp_path / "a.png")
    (tmp_path / "d.txt").write_text("path;text\na.png;hello\n")
    cfg = DataConfig(format="csv", csv_separator=";", image_column="path", caption_column="text")
    assert [r.caption for r in read_dataset(tmp_path / "d.txt", cfg).records] == ["hello"]


def test_compressed_shard_is_a_schema_error_with_a_hint(tmp_path: Path) -> None:
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w:gz") as tf:
        info = tarfile.TarInfo("a.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DataSchemaError, match="gzip-compressed"):
        read_dataset(shard)


@pytest.mark.parametrize("n_images,fraction,expected", [(40, 0.05, 2), (10, 0.05, 1), (200, 0.1, 20), (2, 0.5, 1)])
def test_held_out_validation_is_the_asked_share_of_images_never_empty(tmp_path, n_images, fraction, expected):
    """A held-out split takes round(fraction × images) whole images (at least one), wherever the data lives."""
    from cmalign.data.splits import load_splits
    from cmalign.train.config import DataConfig

    rows = ["filepath\ttitle"]
    for i in range(n_images):
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(tmp_path / f"{i}.png")
        rows += [f"{i}.png\tcaption a of {i}", f"{i}.png\tcaption b of {i}"]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    splits = load_splits(DataConfig(train=str(tmp_path / "train.tsv"), val_fraction=fraction))
    val_keys, train_keys = {r.key for r in splits.val}, {r.key for r in splits.train}
    assert len(val_keys) == expected and not val_keys & train_keys
    assert len(val_keys) + len(train_keys) == n_images and len(splits.val) == 2 * expected
    again = load_splits(DataConfig(train=str(tmp_path / "train.tsv"), val_fraction=fraction))
    assert {r.key for r in again.val} == val_keys


@pytest.mark.parametrize("name, header, row", [
    ("pairs.csv", b"filepath,title\n", b"a.png,caf\xe9 au lait\n"),
    ("pairs.jsonl", b'{"filepath": "a.png", "title": "ok"}\n', b'{"filepath": "a.png", "title": "caf\xe9"}\n'),
])
def test_a_file_that_is_not_utf8_names_the_file_and_row(tmp_path, name, header, row):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    path = tmp_path / name
    path.write_bytes(header + row)
    with pytest.raises(DataSchemaError, match=rf"{name}, row 2: not valid UTF-8 \(byte b'\\xe9'"):
        read_dataset(path)


def test_a_caption_file_that_is_not_utf8_is_named(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DataSchemaError, match=r"a.txt: not valid UTF-8"):
        read_dataset(tmp_path)
