"""Studies: measurements composed from the public pieces (a method's ``train_<method>``, ``export_bundle``,
the profiler). A study owns no training, export or timing code of its own."""
