"""
Matrix: the client-server API over treq (a real Synapse in the tests).

  adapter.py   L{MatrixAdapter}: login, the /sync loop, rooms, sends and edits
  format.py    Markdown to Matrix HTML
"""
