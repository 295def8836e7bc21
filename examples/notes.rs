//! A "notes" daemon and its client on keyhole's public API: the daemon's own
//! messages (AddNote, ListNotes) and an event (NoteAdded) pushed to every
//! connected client, behind keyhole's authenticated socket. It uses the same
//! runtime directory rules and `KEYHOLE_*` variables as keyhole.
//!
//! ```text
//! cargo run --release --example notes -- serve        # the daemon, until SIGTERM or Ctrl-C
//! cargo run --release --example notes -- add TEXT     # prints the new note's id
//! cargo run --release --example notes -- list         # one note per line: ID<TAB>TEXT
//! cargo run --release --example notes -- watch [-c N] # ID<TAB>TEXT per NoteAdded, exits after N
//! ```

use std::process::ExitCode;
use std::sync::Mutex;

use keyhole::client::Delivery;
use keyhole::error::Report;
use keyhole::service::{Call, Connection};
use keyhole::{ConnectOptions, Interface, RuntimePaths, ServerConfig, Service, ServiceError};
use serde::{Deserialize, Serialize};

/// What the notes client and daemon agree on.
struct Notes;

impl Interface for Notes {
    const NAME: &'static str = "notes";
    const VERSION: u32 = 1;
    type Request = Request;
    type Reply = Reply;
    type Event = Event;
}

#[derive(Serialize, Deserialize)]
enum Request {
    AddNote { text: String },
    ListNotes,
}

#[derive(Serialize, Deserialize)]
enum Reply {
    Added { id: u64 },
    Notes(Vec<Note>),
}

#[derive(Serialize, Deserialize)]
enum Event {
    NoteAdded(Note),
}

#[derive(Clone, Serialize, Deserialize)]
struct Note {
    id: u64,
    text: String,
}

#[derive(Debug, thiserror::Error)]
enum NotesError {
    #[error("a note cannot be empty")]
    Empty,
}

impl ServiceError for NotesError {
    fn code(&self) -> u32 {
        0
    }
}

/// The daemon's side: the notes, in memory.
#[derive(Default)]
struct NotesService {
    notes: Mutex<Vec<Note>>,
}

impl Service for NotesService {
    type Interface = Notes;
    type Error = NotesError;
    type Session = ();

    fn open(&self, _connection: &Connection<Notes>) {}

    async fn call(&self, cx: Call<'_, Self>, request: Request) -> Result<Reply, NotesError> {
        let mut notes = self.notes.lock().unwrap_or_else(|p| p.into_inner());
        match request {
            Request::AddNote { text } if text.is_empty() => Err(NotesError::Empty),
            Request::AddNote { text } => {
                let note = Note {
                    id: notes.len() as u64 + 1,
                    text,
                };
                notes.push(note.clone());
                // To every authenticated connection; never to a pending one.
                let _ = cx.server().broadcast(&Event::NoteAdded(note.clone()));
                Ok(Reply::Added { id: note.id })
            }
            Request::ListNotes => Ok(Reply::Notes(notes.clone())),
        }
    }
}

type Error = Box<dyn std::error::Error>;

async fn run(args: &[String]) -> Result<(), Error> {
    let usage = "usage: notes serve | add TEXT | list | watch [-c N]";
    let options = ConnectOptions::new();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["serve"] => {
            let paths =
                RuntimePaths::from_env().ok_or("set KEYHOLE_DIR, XDG_RUNTIME_DIR or HOME")?;
            keyhole::daemon::serve(paths, ServerConfig::default(), NotesService::default()).await?;
        }
        ["add", text] => {
            let client = options.connect::<Notes>().await?;
            let request = Request::AddNote { text: text.into() };
            match client.call(request).await? {
                Reply::Added { id } => println!("{id}"),
                Reply::Notes(_) => return Err("unexpected reply".into()),
            }
        }
        ["list"] => {
            let client = options.connect::<Notes>().await?;
            match client.call(Request::ListNotes).await? {
                Reply::Notes(notes) => notes.iter().for_each(|n| println!("{}\t{}", n.id, n.text)),
                Reply::Added { .. } => return Err("unexpected reply".into()),
            }
        }
        ["watch", ref rest @ ..] => {
            let limit = match rest {
                [] => None,
                ["-c", n] => Some(n.parse::<u64>().map_err(|_| usage)?),
                _ => return Err(usage.into()),
            };
            let client = options.connect::<Notes>().await?;
            let mut events = client.events().ok_or("events already taken")?;
            eprintln!("watching notes");
            let mut seen = 0;
            while limit.is_none_or(|n| seen < n) {
                match events.next_event().await {
                    Some(Ok(Delivery::Event {
                        event: Event::NoteAdded(note),
                        ..
                    })) => println!("{}\t{}", note.id, note.text),
                    // Notes never drops events (it pushes on no stream) and
                    // never accepts descriptors.
                    Some(Ok(_)) => {}
                    Some(Err(err)) => return Err(err.into()),
                    None => return Err("the daemon closed the connection".into()),
                }
                seen += 1;
            }
        }
        _ => return Err(usage.into()),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("notes: {}", Report(&*err));
            ExitCode::FAILURE
        }
    }
}
