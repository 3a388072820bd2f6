"""twinhub's shared contracts: event types, the CloudEvents NATS binding, subjects, codecs.

Pure: nothing here performs I/O.
"""
