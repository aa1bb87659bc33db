"""enginekiln's library: export, probe, build and deploy inference engines, without doit.

Importing it (or any of its modules) creates nothing: no connection, no thread, no file.
Start with `kiln.pipeline.context.Context.load()`; README.md "Where the code is" maps the parts.
"""
