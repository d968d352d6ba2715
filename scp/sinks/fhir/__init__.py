"""The FHIR server sink.

    client      HTTP to the server and the failure rules (retryable / rejected)
    auth        none, bearer, basic, OAuth2 client credentials
    sink        create a study once, merge every later part
"""
