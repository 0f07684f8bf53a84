"""The bottom layer every lvd package shares: atomic files, devices and dtypes, image file names.

`lvd.pretrain`, `lvd.index` and `lvd.curate` all import from here, and this imports nothing of
ours, so one helper exists once.
"""
