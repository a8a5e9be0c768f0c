"""PKCS#11 knowledge: constants (names <-> values), attribute kinds, data types and
the cffi binding of a module's function list (``binding.Module``)."""
