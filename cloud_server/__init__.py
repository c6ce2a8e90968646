from common.openmp import quiet_idle_threads

quiet_idle_threads()  # before anything imports torch: see common/openmp.py
