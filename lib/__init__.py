# Before any lib module imports transformers or bitsandbytes: one of the warnings lib/quiet.py
# silences is logged while bitsandbytes is imported (jobs.train imports it at module level).
from lib import quiet as _quiet

_quiet.install()
