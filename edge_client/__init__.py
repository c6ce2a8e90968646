from common.malloc import keep_freed_buffers
from common.openmp import quiet_idle_threads

quiet_idle_threads()  # before anything imports torch: see common/openmp.py
keep_freed_buffers()  # see common/malloc.py
