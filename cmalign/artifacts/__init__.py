"""What every stage writes and reads back: atomic files, manifests, which artifact a path is, the error base."""
