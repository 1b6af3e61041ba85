"""The bottom layer: config machinery, errors, atomic files and checkpoint files, progress bars."""
