"""Image–caption data: records, reader options, readers for user formats, splits, the generated default set."""
