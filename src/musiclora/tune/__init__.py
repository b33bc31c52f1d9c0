"""Ray Tune: the search (`search.py`: space, driver, winner publishing) and its report (`report.py`)."""
