"""A folder of ``foo.jpg`` + ``foo.txt`` pairs: the layout most captioning and fine-tuning tools write.

Each image's caption sits beside it in a text file of the same stem (one caption per line), and an optional
``foo.label`` or ``foo.cls`` names its class. Sub-folders are walked in sorted order, hidden ones skipped, so
the records come out in the same order on every machine.
"""

from __future__ import annotations

import os

from cmalign.data.readers.shared import clean_label, is_image_name, read_text
from cmalign.data.records import BadSample, ReadResult, Record


def dir_has_images(root: str) -> bool:
    """Whether any (non-hidden) file under ``root`` is an image: the folder format, not WebDataset shards."""
    for _dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(is_image_name(n) for n in filenames):
            return True
    return False


def read_folder(root: str) -> ReadResult:
    """Read every image under ``root`` that has a caption file beside it; list the others as skipped."""
    result = ReadResult()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        present = set(filenames)
        for name in sorted(filenames):
            if not is_image_name(name):
                continue
            stem = name.rsplit(".", 1)[0]
            image = os.path.join(dirpath, name)
            key = os.path.abspath(image)
            txt = os.path.join(dirpath, stem + ".txt")
            if stem + ".txt" not in present:
                result.skipped.append(BadSample(image, "caption", f"no {stem}.txt beside {name}"))
                continue
            try:
                text = read_text(txt)
            except (OSError, UnicodeDecodeError) as e:
                result.skipped.append(BadSample(txt, "caption", f"cannot read caption: {e}"))
                continue
            label_file = next((stem + e for e in (".label", ".cls") if stem + e in present), None)
            try:
                label = clean_label(read_text(os.path.join(dirpath, label_file))) if label_file else None
            except (OSError, UnicodeDecodeError) as e:
                result.skipped.append(BadSample(txt, "label", f"cannot read {label_file}: {e}"))
                continue
            lines = [(n, s.strip()) for n, s in enumerate(text.splitlines(), start=1) if s.strip()]
            if not lines:
                result.skipped.append(BadSample(txt, "caption", "empty caption"))
            for n, caption in lines:  # several lines: several captions of one image
                source = txt if len(lines) == 1 else f"{txt}:{n}"
                result.records.append(Record(key, caption, label, key, source))
    return result
