"""Image–caption data: readers for user formats, the generated default set, torch datasets."""
