"""
Matrix: the client-server API over treq (a real Synapse in the tests), with end-to-end
encryption on vodozemac.

  adapter.py      L{MatrixAdapter}: login and the device, the /sync loop, rooms, sends, edits,
                  held undecryptable events, media in and out
  format.py       Markdown to Matrix HTML
  media.py        mxc URIs, media messages, reply image links
  crypto.py       L{MatrixCrypto}: Olm/Megolm, device lists, key upload, key sharing, rotation
  cryptostore.py  the per-device SQLite crypto store (pickles encrypted, single writer)
  backup.py       server-side key backup and the recovery key
  crosssigning.py the account's cross-signing identity and the device's signature
  attachments.py  encrypted attachments (AES-CTR, SHA-256)
  encoding.py     canonical JSON and unpadded base64
"""
