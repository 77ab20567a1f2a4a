"""The conversation store's schema, as migrations: PRAGMA user_version says how many have run.

Migration i takes the database from version i to i + 1, inside the transaction that bumps
user_version, so a crash mid-migration leaves the old version. Append new ones; never edit old ones.
"""

MIGRATIONS = [
    """
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        title TEXT NOT NULL DEFAULT '',
        model TEXT,
        system_prompt TEXT,
        settings TEXT,
        source TEXT NOT NULL DEFAULT 'web' CHECK (source IN ('web', 'api')),
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX conversations_updated ON conversations(updated_at);
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        parent_id INTEGER REFERENCES messages(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        content TEXT NOT NULL,
        model TEXT,
        settings TEXT,
        finish_reason TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        created_at REAL NOT NULL
    );
    CREATE INDEX messages_conversation ON messages(conversation_id);
    CREATE INDEX messages_parent ON messages(parent_id);
    CREATE TABLE ratings (
        message_id INTEGER PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
        rating INTEGER NOT NULL CHECK (rating IN (-1, 1)),
        created_at REAL NOT NULL
    );
    CREATE TABLE rankings (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        chosen_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        rejected_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        created_at REAL NOT NULL,
        UNIQUE (chosen_id, rejected_id)
    );
    CREATE INDEX rankings_rejected ON rankings(rejected_id);
    """,
    # 2: pictures in user messages (store_images.py). A picture's bytes are kept once however many
    # messages hold it (an API client re-sends the whole conversation, pictures included, every turn);
    # `char_offset` is where it sits in its message's content, in characters (code points), and a message's
    # pictures are in id order (which is offset order)
    """
    CREATE TABLE image_blobs (
        sha256 TEXT PRIMARY KEY,
        media_type TEXT NOT NULL CHECK (media_type IN ('image/png', 'image/jpeg')),
        data BLOB NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE images (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        char_offset INTEGER NOT NULL CHECK (char_offset >= 0),
        sha256 TEXT NOT NULL REFERENCES image_blobs(sha256)
    );
    CREATE INDEX images_message ON images(message_id);
    CREATE INDEX images_sha256 ON images(sha256);
    """,
    # 3: the Responses API's stored responses (store_responses.py). `turns` holds the conversation so far as
    # chat messages (the system prompt aside: a response's instructions are not carried to the next), this
    # response's answer last, so that previous_response_id needs this one row, whatever was deleted before
    """
    CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        previous_id TEXT,
        model TEXT NOT NULL,
        turns TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)