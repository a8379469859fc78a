"""Read a user's image–caption data set, in whichever common layout it already has, into records.

Users arrive with data laid out for some other tool: open_clip's CSV/TSV, JSON lines, COCO
captions, a folder of ``foo.jpg`` + ``foo.txt`` pairs (the layout most captioning tools write), or
WebDataset shards. Converting first is a chore that loses row numbers, so each layout is read
directly and every record keeps a ``source`` pointing back at the user's own file and row.

Two kinds of problem are kept apart (see :mod:`cmalign.data.records`): a malformed file raises
:class:`DataSchemaError` at once; one unusable sample becomes a :class:`BadSample` and reading goes on.
Images are only named here, never decoded — listing must stay cheap for millions of rows.

One module per layout (:mod:`.csv_tsv`, :mod:`.jsonl`, :mod:`.coco`, :mod:`.folder`, :mod:`.webdataset`),
what they share in :mod:`.shared`, and the entry point :func:`read_dataset` with format detection in
:mod:`.dispatch`. How to read a file is said by a :class:`cmalign.data.options.ReaderOptions`.
"""

from cmalign.data.options import FORMATS
from cmalign.data.readers.dispatch import detect_format, read_dataset
from cmalign.data.readers.shared import IMAGE_EXTENSIONS
from cmalign.data.readers.webdataset import TarMember, expand_braces

__all__ = ["FORMATS", "IMAGE_EXTENSIONS", "TarMember", "detect_format", "expand_braces", "read_dataset"]
