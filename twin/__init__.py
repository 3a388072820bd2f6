"""The twin service: folds the event log into the MongoDB device twin."""
