"""The bottom layer: errors, durations, files and processes. Imports nothing else of ftl."""
