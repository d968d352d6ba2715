"""Receive: the DICOM side of the node (layer above the pipeline and the store).

    access      who may open an association (AE titles, addresses) and the A-ASSOCIATE-RJ codes
    tls         the server's DICOM TLS context and the per-connection handshake
    status      every DIMSE status the node answers, in one table
    dataset     a received C-STORE data set read just enough to spool it
    handlers    the C-STORE / C-ECHO handlers (always return a status) and association bookkeeping
    transport   every use of pynetdicom internals (socket tuning, the response gate, the reader,
                _config switches): the one file to re-check on a pynetdicom upgrade
    server      the pynetdicom AE and its listening socket
"""
