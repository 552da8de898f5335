"""The process runtime: the ``executable`` target as a supervised host process."""
