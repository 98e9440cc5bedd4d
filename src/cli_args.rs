//! The command line's definitions: the clap derive types that `src/main.rs` parses and
//! dispatches, and that `examples/generate-docs.rs` turns into completions and man pages.
//! Long by nature (every flag of every command, with its help text, which is the man page's);
//! nothing else lives here.

use clap::{Parser, Subcommand, ValueEnum};
use cowimg_formats::Prealloc;

#[derive(Parser)]
#[command(
    name = "cowimg",
    version,
    about = "QEMU disk images (qcow2, QED, raw): create, inspect, check, rebase and stream backing chains"
)]
#[command(after_help = "Examples:
  cowimg create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2
  cowimg info --backing-chain overlay.qcow2
  cowimg stream overlay.qcow2

Run 'cowimg COMMAND --help' for a command's options.")]
// Visible to the crate root so that the docs generator (examples/generate-docs.rs) and the
// help tests, which include this file as a module, can walk the definitions.
pub(crate) struct Cli {
    /// Trust the CAs in this PEM file (instead of the system's, and of SSL_CERT_FILE) for
    /// https:// images and backing files: a private or test CA.
    #[arg(long, global = true, value_name = "PEM")]
    pub(crate) ca_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Output {
    /// Text for people, laid out as qemu-img lays it out.
    Human,
    /// One JSON document on stdout, with qemu-img's keys.
    Json,
}

/// A flag's value: on or off.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum OnOff {
    On,
    Off,
}

/// How a copy into an image runs and reports (stream, rebase).
#[derive(clap::Args, Clone)]
pub(crate) struct CopyArgs {
    /// Cap on bytes copied per second, or read over the network where more (K, M, G
    /// suffixes; 0 = unlimited).
    #[arg(long, default_value = "0")]
    pub(crate) speed: String,
    /// Copy workers (default: number of cores; at least 8 for an NBD source, 16 for HTTP(S)).
    #[arg(long)]
    pub(crate) jobs: Option<usize>,
    /// Show a progress bar even when stderr is not a terminal.
    #[arg(short = 'p')]
    pub(crate) progress: bool,
    /// Progress as JSON lines on stderr: --progress json.
    #[arg(long = "progress", value_name = "json")]
    pub(crate) progress_format: Option<String>,
    /// Output format of the result: human or json.
    #[arg(long, value_enum, default_value = "human")]
    pub(crate) output: Output,
}

/// The options every long operation takes to run as a job (docs/jobs.md).
#[derive(clap::Args, Clone)]
pub(crate) struct JobArgs {
    /// The job's id, for 'cowimg job ...' (default: the image's file name, with -2, -3, ...
    /// added while a job of that name runs).
    #[arg(long, value_name = "ID")]
    pub(crate) job_id: Option<String>,
    /// The job's control socket (default: $XDG_RUNTIME_DIR/cowimg/ID.sock, else
    /// /tmp/cowimg-$UID/ID.sock).
    #[arg(long, value_name = "PATH")]
    pub(crate) control: Option<String>,
    /// Write the job's events (created, running, paused, resumed, speed-changed, completed,
    /// cancelled, error) as JSON lines to FILE, or stdout with '-'.
    #[arg(long, value_name = "FILE|-")]
    pub(crate) events: Option<String>,
}

impl From<JobArgs> for cowimg::job::ControlOptions {
    fn from(a: JobArgs) -> Self {
        cowimg::job::ControlOptions {
            job_id: a.job_id,
            control: a.control,
            events: a.events,
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Create a new image, optionally over a backing file.
    #[command(after_help = "Examples:
  cowimg create -f qcow2 disk.qcow2 20G
  cowimg create -f qcow2 -b base.qcow2 -F qcow2 --copy-on-read overlay.qcow2
  cowimg create -f qcow2 -o cluster_size=2M,lazy_refcounts=on big.qcow2 1T")]
    Create {
        /// Image format: qcow2, qed or raw.
        #[arg(short = 'f', long = "format", default_value = "raw")]
        format: String,
        /// Backing file (stored as given; a relative name is relative to FILE's directory).
        #[arg(short = 'b', long = "backing")]
        backing: Option<String>,
        /// Format of the backing file (required with -b, as in qemu-img).
        #[arg(short = 'F', long = "backing-format")]
        backing_format: Option<String>,
        /// Format options, qemu-img style: cluster_size=64K,compat=v3,lazy_refcounts=on,...
        #[arg(short = 'o', long = "options")]
        options: Vec<String>,
        /// Cluster size (same as -o cluster_size=).
        #[arg(long)]
        cluster_size: Option<String>,
        /// Store cowimg's copy-on-read flag: reads through cowimg copy backing data in.
        #[arg(long)]
        copy_on_read: bool,
        /// Do not open the backing file (then SIZE is required).
        #[arg(short = 'u')]
        unsafe_backing: bool,
        /// Replace FILE if it exists (refused by default).
        #[arg(long)]
        force: bool,
        /// Print nothing on success (no "Formatting ..." line).
        #[arg(short = 'q', long)]
        quiet: bool,
        /// The image to create.
        file: String,
        /// Virtual size (K, M, G, T suffixes); defaults to the backing file's size.
        size: Option<String>,
    },
    /// Show an image's format, size, backing file and format-specific facts.
    #[command(after_help = "Examples:
  cowimg info disk.qcow2
  cowimg info --backing-chain overlay.qcow2
  cowimg info --output json -U running-vm.qcow2")]
    Info {
        /// Format of FILE (qcow2, qed or raw); probed from its contents when absent.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Show every image of the backing chain.
        #[arg(long)]
        backing_chain: bool,
        /// Output format: human or json.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Read even if another process is writing the image (force share).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// The image to describe.
        file: String,
    },
    /// Check an image's metadata for errors and leaks, optionally repairing them.
    #[command(after_help = "Examples:
  cowimg check disk.qcow2
  cowimg check -r leaks --output json disk.qcow2
  cowimg check -r all damaged.qcow2")]
    Check {
        /// Format of FILE (qcow2, qed or raw); probed from its contents when absent.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Repair: `leaks` frees leaked clusters, `all` fixes errors too.
        #[arg(short = 'r', long = "repair")]
        repair: Option<String>,
        /// Output format: human or json.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Print nothing; the exit status tells the result (0 clean, 2 corrupt, 3 leaks).
        #[arg(short = 'q', long)]
        quiet: bool,
        /// Check even if another process is writing the image (results may be stale).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// The image to check.
        file: String,
    },
    /// Show where each guest range of an image comes from.
    #[command(after_help = "Examples:
  cowimg map overlay.qcow2
  cowimg map --output json overlay.qcow2
  cowimg map --start-offset 1G --max-length 64M disk.qcow2")]
    Map {
        /// Format of FILE (qcow2, qed or raw); probed from its contents when absent.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Output format: human or json.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Read even if another process is writing the image (force share).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Guest offset to start mapping at (K, M, G, T suffixes).
        #[arg(long, default_value = "0")]
        start_offset: String,
        /// Map at most this many bytes from --start-offset (default: to the end).
        #[arg(long)]
        max_length: Option<String>,
        /// The image to map (read through its backing chain).
        file: String,
    },
    /// Compare the guest contents of two images.
    #[command(after_help = "Examples:
  cowimg compare original.qcow2 copy.raw
  cowimg compare -q a.qcow2 b.qcow2 && echo identical
  cowimg compare --diff --max 10 --output json golden.qcow2 result.qcow2")]
    Compare {
        /// Format of A (qcow2, qed or raw); probed when absent.
        #[arg(short = 'f')]
        format_a: Option<String>,
        /// Format of B (qcow2, qed or raw); probed when absent.
        #[arg(short = 'F')]
        format_b: Option<String>,
        /// Strict: sizes and allocation must match too.
        #[arg(short = 's')]
        strict: bool,
        /// Print nothing; the exit status tells (0 identical, 1 different, 2 error).
        #[arg(short = 'q')]
        quiet: bool,
        /// Read even if another process is writing the images (force share).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Copy what each image's backing chain provides into it as it is read (opens it
        /// read-write). Without it both images are only read, flagged copy-on-read or not.
        #[arg(long, conflicts_with = "no_copy_on_read")]
        copy_on_read: bool,
        /// Accepted for compatibility and does nothing: reading never copies without
        /// --copy-on-read.
        #[arg(long)]
        no_copy_on_read: bool,
        /// List every differing range (offset, length, what each side holds), not only the
        /// first offset.
        #[arg(long, conflicts_with = "strict")]
        diff: bool,
        /// With --diff: stop after this many ranges.
        #[arg(long, requires = "diff", value_name = "N")]
        max: Option<usize>,
        /// With --diff: output format, human or json.
        #[arg(long, value_enum, default_value = "human", requires = "diff")]
        output: Output,
        /// The first image.
        a: String,
        /// The second image.
        b: String,
    },
    /// Print a digest of each image's guest disk: the same for raw, qcow2 and QED images
    /// holding the same bytes, whatever their layout; blksum computes the same digest. Each
    /// image is a job that 'cowimg job' steers (set-speed caps the bytes read per second).
    #[command(after_help = "Examples:
  cowimg checksum disk.qcow2
  cowimg checksum -a sha512 golden.qcow2 flat.raw
  cowimg checksum --output json -p big.qcow2")]
    Checksum {
        /// Format of the images (qcow2, qed or raw); probed from each one's contents when absent.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Digest algorithm: sha1, sha224, sha256, sha384, sha512, sha512-224, sha512-256.
        #[arg(short = 'a', long = "algorithm", default_value = "sha256")]
        algorithm: String,
        /// Hashing threads (default: number of cores).
        #[arg(long)]
        jobs: Option<usize>,
        /// Show a progress bar even when stderr is not a terminal.
        #[arg(short = 'p')]
        progress: bool,
        /// Output format: human (DIGEST  FILENAME lines) or json.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Read even if another process is writing the images (force share).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[command(flatten)]
        job: JobArgs,
        /// The images to digest (each read through its backing chain).
        #[arg(required = true)]
        files: Vec<String>,
    },
    /// Copy into FILE what its backing chain provides above BASE, then make BASE its backing
    /// file (none without --base). Safe to interrupt; running it again resumes. Runs as a job:
    /// 'cowimg job' queries, re-caps, pauses, cancels or waits for it (docs/jobs.md).
    #[command(after_help = "Examples:
  cowimg stream C.qcow2                 # A <- B <- C  =>  C standalone
  cowimg stream --base A.qcow2 C.qcow2  # A <- B <- C  =>  A <- C
  cowimg stream --speed 200M -p B.qcow2 # A <- B <- C  =>  B <- C, capped, with a progress bar")]
    Stream {
        /// Format of FILE (qcow2 or qed); probed from its contents when absent.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// The backing file to keep (matched by resolved path); default: none.
        #[arg(short = 'b', long)]
        base: Option<String>,
        #[command(flatten)]
        copy: CopyArgs,
        /// Stream only the range starting here (never changes the backing file).
        #[arg(long)]
        offset: Option<String>,
        /// Length of the range to stream.
        #[arg(long)]
        length: Option<String>,
        /// Write the copied clusters compressed (qcow2), for an archive-ready image.
        #[arg(short = 'c', long)]
        compress: bool,
        #[command(flatten)]
        job: JobArgs,
        /// The image to fill (any image of the chain; images above it read the same).
        file: String,
    },
    /// Export an image over NBD (qemu-nbd's options), copying what clients read from the
    /// backing chain into the image when it has the copy-on-read flag (or --copy-on-read).
    /// SIGINT/SIGTERM: stop accepting, finish requests in flight, commit, exit 0.
    #[command(after_help = "Examples:
  cowimg serve -k /tmp/disk.sock overlay.qcow2        # nbd+unix:///?socket=/tmp/disk.sock
  cowimg serve -b 127.0.0.1 -p 10809 -x disk -t -r --copy-on-read overlay.qcow2
  cowimg serve -k /tmp/disk.sock --stream --speed 50M overlay.qcow2   # instant-on
  qemu-img info 'nbd+unix:///?socket=/tmp/disk.sock'")]
    Serve {
        /// Format of IMAGE; probed from its contents when absent.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Listen on this Unix socket (instead of TCP).
        #[arg(short = 'k', long = "socket", conflicts_with_all = ["bind", "port"])]
        socket: Option<String>,
        /// Address to listen on (TCP).
        #[arg(short = 'b', long = "bind", default_value = "0.0.0.0")]
        bind: String,
        /// TCP port to listen on.
        #[arg(short = 'p', long = "port", default_value = "10809")]
        port: u16,
        /// The export's name (clients asking for the empty name get it too).
        #[arg(short = 'x', long = "export-name", default_value = "")]
        export: String,
        /// Description shown to clients (nbdinfo).
        #[arg(short = 'D', long = "description", default_value = "")]
        description: String,
        /// Refuse client writes (copy-on-read still fills the image).
        #[arg(short = 'r', long = "read-only")]
        read_only: bool,
        /// Copy what clients read from the backing chain into IMAGE, whatever its flag says.
        #[arg(long, conflicts_with = "no_copy_on_read")]
        copy_on_read: bool,
        /// Never copy on read, whatever the image's flag says.
        #[arg(long)]
        no_copy_on_read: bool,
        /// Clients served at once (more wait to be accepted).
        #[arg(short = 'e', long = "shared", default_value = "16")]
        shared: usize,
        /// Keep serving after the last client disconnects (until SIGINT/SIGTERM).
        #[arg(short = 't', long = "persistent")]
        persistent: bool,
        /// Write the server's process id to this file once it listens.
        #[arg(long = "pid-file")]
        pid_file: Option<String>,
        /// While serving, copy into IMAGE what its backing chain provides (down to --base),
        /// never over what clients wrote; then switch its backing file to --base (or none)
        /// without disturbing clients. Stopped, it commits what it copied; run again, it
        /// resumes. Without -t the server exits once the stream is done and clients have left.
        /// The stream is a job: 'cowimg job' steers it (--job-id, --control, --events).
        #[arg(long)]
        stream: bool,
        /// With --stream: the backing file to keep (matched by resolved path); default: none.
        #[arg(long, requires = "stream")]
        base: Option<String>,
        /// With --stream: cap on bytes streamed per second (K, M, G suffixes; 0 = unlimited).
        #[arg(long, requires = "stream", default_value = "0")]
        speed: String,
        /// Seconds a client has to finish the handshake before it is dropped (0: no limit),
        /// so that a client sending nothing cannot hold an -e slot.
        #[arg(long = "handshake-limit", default_value = "10", value_name = "N")]
        handshake_limit: u64,
        /// With --stream: the stream job's id, control socket and events.
        #[command(flatten)]
        job: JobArgs,
        /// The image to export.
        image: String,
    },
    /// Point an image at a new backing file. Safe by default: data that would read
    /// differently is copied into the image first (parallel, resumable, a job that
    /// 'cowimg job' steers); -u only changes the pointer.
    #[command(after_help = "Examples:
  cowimg rebase -b new-base.qcow2 -F qcow2 C.qcow2
  cowimg rebase -u -b moved/base.qcow2 -F qcow2 C.qcow2
  cowimg rebase -b \"\" --speed 100M -p C.qcow2   # make C standalone")]
    Rebase {
        /// Format of FILE (qcow2 or qed); probed from its contents when absent.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// The new backing file, stored as given (relative to FILE's directory); "" for none.
        #[arg(short = 'b', long = "backing")]
        backing: Option<String>,
        /// Format of the new backing file (required with a non-empty -b).
        #[arg(short = 'F', long = "backing-format")]
        backing_format: Option<String>,
        /// Unsafe: change only the pointer (the new backing file need not exist).
        #[arg(short = 'u')]
        unsafe_mode: bool,
        #[command(flatten)]
        copy: CopyArgs,
        /// Open the new backing file shared (it may be in use elsewhere).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Write the copied clusters compressed (qcow2).
        #[arg(short = 'c', long)]
        compress: bool,
        #[command(flatten)]
        job: JobArgs,
        /// The image to repoint.
        file: String,
    },
    /// Write TOP's data into its backing file (or BASE further down), then empty TOP
    /// (qcow2), as qemu-img commit. The chain above reads the same throughout; safe to
    /// interrupt, and running it again finishes. Runs as a job that 'cowimg job' steers.
    #[command(after_help = "Examples:
  cowimg commit C.qcow2                # B <- C  =>  C's data in B, C emptied
  cowimg commit -d C.qcow2             # the same, C keeps its data
  cowimg commit -b A.qcow2 -p C.qcow2  # A <- B <- C  =>  C's and B's data in A (B is then stale)")]
    Commit {
        /// Format of TOP (qcow2, qed or raw); probed from its contents when absent.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// The image to commit into (in TOP's backing chain; default: TOP's backing file).
        /// Implies -d; the images between BASE and TOP no longer read as before.
        #[arg(short = 'b', long)]
        base: Option<String>,
        /// Keep TOP's data: skip emptying it after the commit (qemu-img's -d, --drop).
        #[arg(short = 'd', long = "drop")]
        keep_top: bool,
        /// Cap on bytes copied per second, or read over the network where more (K, M, G
        /// suffixes; 0 = unlimited).
        #[arg(short = 'r', long, alias = "rate", default_value = "0")]
        speed: String,
        /// Copy workers (default: number of cores; at least 8 for an NBD source, 16 for HTTP(S)).
        #[arg(long)]
        jobs: Option<usize>,
        /// Show a progress bar.
        #[arg(short = 'p')]
        progress: bool,
        /// Progress as JSON lines on stderr: --progress json.
        #[arg(long = "progress", value_name = "json")]
        progress_format: Option<String>,
        /// Output format of the result: human or json.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Print nothing on success.
        #[arg(short = 'q')]
        quiet: bool,
        #[command(flatten)]
        job: JobArgs,
        /// The image whose data is committed.
        file: String,
    },
    /// Change an image's virtual size, as qemu-img resize: SIZE, +SIZE or -SIZE.
    /// Shrinking needs --shrink and drops the data past the new end.
    #[command(after_help = "Examples:
  cowimg resize disk.qcow2 +10G
  cowimg resize --shrink disk.qcow2 8G
  cowimg resize --preallocation=full disk.raw 20G")]
    Resize {
        /// Format of FILE (qcow2, qed or raw); probed from its contents when absent.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Allow the new size to be smaller (the data past it is lost).
        #[arg(long)]
        shrink: bool,
        /// How the grown range is provided: off, metadata (qcow2), falloc or full.
        #[arg(long, value_enum, default_value = "off")]
        preallocation: PreallocArg,
        /// Print nothing on success.
        #[arg(short = 'q')]
        quiet: bool,
        /// The image to resize.
        file: String,
        /// The new size, or +SIZE / -SIZE relative to the current one (K, M, G, T suffixes).
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
    /// How big a new image made from FILE (or of --size) would be.
    #[command(after_help = "Examples:
  cowimg measure -O qcow2 disk.raw
  cowimg measure -O qcow2 -c --output json disk.raw
  cowimg measure -O qcow2 -o cluster_size=2M --size 1T")]
    Measure {
        /// Format of FILE (qcow2, qed or raw); probed from its contents when absent.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Output format: qcow2, qed or raw.
        #[arg(short = 'O', default_value = "raw")]
        out_format: String,
        /// Options of the output format, as for create: cluster_size=2M,extended_l2=on,...
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Measure an empty image of this size instead of FILE.
        #[arg(long)]
        size: Option<String>,
        /// Estimate the compressed size (qcow2) from a sample of FILE.
        #[arg(short = 'c')]
        compress: bool,
        /// Output format of the result: human or json.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Read even if another process is writing the image (force share).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// The image to measure (read through its backing chain); or give --size.
        file: Option<String>,
    },
    /// Change options of an existing image in place (crash-safe).
    #[command(after_help = "Examples:
  cowimg amend --copy-on-read=on app.qcow2
  cowimg amend -o compat=0.10 vm.qcow2
  cowimg amend -o compat=1.1,refcount_bits=64,lazy_refcounts=on vm.qcow2

The qcow2 options apply in qemu-img's order: the upgrade (compat=1.1) first, then
refcount_bits, then lazy_refcounts, the downgrade (compat=0.10) last; each step is
crash-safe.")]
    Amend {
        /// qemu-img's options (qcow2): compat=0.10|1.1 (v2 or v3; a downgrade expands zero
        /// clusters), refcount_bits=1|2|4|...|64 (v3), lazy_refcounts=on|off (v3); the
        /// others (size, backing_file, ...) are not changed by cowimg amend yet.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Format of FILE (qcow2 or qed); probed from its contents when absent.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Set or clear cowimg's copy-on-read flag (qcow2, qed).
        #[arg(long, value_enum, value_name = "on|off")]
        copy_on_read: Option<OnOff>,
        /// The image to change in place.
        file: String,
    },
    /// List, create, apply or delete a qcow2 image's internal snapshots, as qemu-img snapshot.
    #[command(after_help = "Examples:
  cowimg snapshot -c before-upgrade vm.qcow2
  cowimg snapshot -a before-upgrade vm.qcow2
  cowimg snapshot -d before-upgrade vm.qcow2

-a takes a snapshot's ID or its name (the ID is tried first), -d a name (the first snapshot
of that name), as qemu-img does; -c accepts a name that is already used (as qemu-img: the
new snapshot gets the next free ID).
Without an action the snapshots are listed. Each change is crash-safe: a kill leaves the image
as before or as after, at worst with leaked clusters or COPIED flags that `cowimg check -r all`
or a re-run puts right. QED and raw images have no internal snapshots: they list nothing and
refuse the rest, as in qemu-img.")]
    Snapshot {
        /// List the snapshots (the default).
        #[arg(short = 'l', long = "list")]
        list: bool,
        /// Create a snapshot of the current state named NAME.
        #[arg(short = 'c', value_name = "NAME")]
        create: Option<String>,
        /// Apply (revert to) the snapshot with this ID or name: data and size.
        #[arg(short = 'a', value_name = "SNAPSHOT")]
        apply: Option<String>,
        /// Delete the (first) snapshot with this name.
        #[arg(short = 'd', value_name = "SNAPSHOT")]
        delete: Option<String>,
        /// Format of FILE (qcow2, qed or raw); probed from its contents when absent.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Read even if another process is writing the image (force share; -l only).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Quiet (accepted as in qemu-img; the changes print nothing anyway).
        #[arg(short = 'q')]
        quiet: bool,
        /// The image.
        file: String,
    },
    /// Empty an overlay so it reads as its backing file again, keeping its options (atomic).
    #[command(after_help = "Examples:
  cowimg reset test-overlay.qcow2
  cowimg reset -f qed test-overlay.qed

The overlay is replaced by an empty one (backing file, backing format, cluster size and
other options, copy-on-read flag kept; mode and owner kept); a kill leaves the old or the
new one. Refused while another process holds the image, and for an image without a backing
file or with internal snapshots, persistent bitmaps or an external data file.")]
    Reset {
        /// Format of FILE (qcow2 or qed); probed from its contents when absent.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// The overlay to empty.
        file: String,
    },
    /// Watch and steer running jobs (stream, rebase, commit, convert, checksum) over their
    /// control sockets: list, query, set-speed, pause, resume, cancel, wait. JOB is a job id
    /// (a socket in $XDG_RUNTIME_DIR/cowimg/, else /tmp/cowimg-$UID/) or the path of a
    /// --control socket; docs/jobs.md describes the protocol.
    #[command(after_help = "Examples:
  cowimg job query pull               # after: cowimg stream --speed 20M --job-id pull C.qcow2
  cowimg job set-speed pull 60M
  cowimg job wait --events pull")]
    Job {
        #[command(subcommand)]
        verb: JobVerb,
    },
    /// Write an image's guest contents (through its chain) to a new standalone image. Runs
    /// as a job that 'cowimg job' steers (its default id is DST's file name).
    #[command(after_help = "Examples:
  cowimg convert -O raw overlay.qcow2 flat.raw
  cowimg convert -O qcow2 -c -o compression_type=zstd -p disk.raw archive.qcow2
  cowimg convert -O raw disk.qcow2 /dev/sdX")]
    Convert {
        /// Format of SRC (qcow2, qed or raw); probed from its contents when absent.
        #[arg(short = 'f')]
        format: Option<String>,
        /// Output format: raw, qcow2 or qed.
        #[arg(short = 'O', default_value = "raw")]
        out_format: String,
        /// Options of the output format, as for create: cluster_size=2M,compression_type=zstd,...
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Show a progress bar.
        #[arg(short = 'p')]
        progress: bool,
        /// Progress as JSON lines on stderr: --progress json.
        #[arg(long = "progress", value_name = "json")]
        progress_format: Option<String>,
        /// Copy workers (default: number of cores; at least 8 for an NBD source, 16 for HTTP(S)).
        #[arg(long)]
        jobs: Option<usize>,
        /// Read even if another process is writing SRC (force share).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Copy what the source's backing chain provides into the source as it is read
        /// (opens it read-write). Without it the source is only read, flagged or not.
        #[arg(long, conflicts_with = "no_copy_on_read")]
        copy_on_read: bool,
        /// Accepted for compatibility and does nothing: reading never copies without
        /// --copy-on-read.
        #[arg(long)]
        no_copy_on_read: bool,
        /// Compress clusters where they shrink (qcow2 output; -o compression_type=zlib|zstd).
        #[arg(short = 'c')]
        compress: bool,
        /// Write into the existing DST in place, creating nothing: DST must be an image of
        /// the -O format at least as large as SRC (bytes past SRC's size are kept).
        #[arg(short = 'n')]
        no_create: bool,
        /// Make DST an overlay of BACKING holding only what SRC's top layer holds (as
        /// qemu-img: SRC's own backing chain is assumed to read as BACKING does).
        #[arg(short = 'B', long = "backing", value_name = "BACKING")]
        backing: Option<String>,
        /// Format of BACKING (required with -B, as qemu-img requires it).
        #[arg(short = 'F', long = "backing-format", requires = "backing")]
        backing_format: Option<String>,
        /// Zeros must run this long (a multiple of 512, up to 16M) to be left as holes;
        /// 0 writes every byte (a fully allocated DST). Default: every zero allocation unit.
        #[arg(short = 'S', long = "sparse-size", value_name = "SIZE")]
        sparse_size: Option<String>,
        /// Cap on bytes copied per second, or read over the network where more (K, M, G
        /// suffixes; 0 = unlimited).
        #[arg(short = 'r', long, alias = "rate", default_value = "0")]
        speed: String,
        /// Parallel requests, as qemu-img's coroutines (1 to 16): the copy workers, unless
        /// --jobs is given.
        #[arg(short = 'm', long = "parallel", value_name = "N")]
        parallel: Option<String>,
        /// Accepted for qemu-img compatibility: cowimg's workers always write out of order
        /// (the output is consistent only once it is complete, and appears then).
        #[arg(short = 'W', long = "oob-writes")]
        oob_writes: bool,
        /// Accepted for qemu-img compatibility (none, writeback, writethrough, directsync,
        /// unsafe): cowimg writes through the page cache and syncs DST before exit 0 whatever
        /// the mode.
        #[arg(short = 't', long = "target-cache", value_name = "CACHE")]
        target_cache: Option<String>,
        /// Accepted for qemu-img compatibility (as -t): sources are read through the page cache.
        #[arg(short = 'T', long = "source-cache", value_name = "CACHE")]
        source_cache: Option<String>,
        /// No progress bar, even with -p.
        #[arg(short = 'q', long = "quiet")]
        quiet: bool,
        /// Read SRC as its internal snapshot holds it (qcow2): an id or a name, or
        /// snapshot.id=ID,snapshot.name=NAME, as qemu-img takes it.
        #[arg(short = 'l', long = "source-snapshot", value_name = "SNAPSHOT")]
        source_snapshot: Option<String>,
        /// With -n: DST reads as zeros already (a new export, a fresh device), so SRC's zero
        /// ranges are skipped instead of written.
        #[arg(long)]
        target_is_zero: bool,
        #[command(flatten)]
        job: JobArgs,
        /// The images to read (each through its backing chain), then DST: several sources
        /// are written one after the other, as qemu-img concatenates them. DST is the new
        /// image; an existing file is replaced once the copy is complete (through symlinks,
        /// keeping owner and mode); a device or an NBD export (nbd://HOST:PORT/NAME,
        /// nbd+unix:///NAME?socket=PATH, nbd:...) is written in place.
        #[arg(required = true, num_args = 2.., value_name = "SRC... DST")]
        files: Vec<String>,
    },
}

/// The verbs of `cowimg job`.
#[derive(Subcommand)]
pub(crate) enum JobVerb {
    /// List the running jobs of this user.
    List {
        /// Output format: human or json.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Show a job's state, cur/end, bytes copied, current speed, cap, elapsed time and ETA.
    Query {
        /// Output format: human or json (query-block-jobs' entry).
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// The job's id or control socket path.
        job: String,
    },
    /// Change a job's speed cap while it runs (block-job-set-speed); it applies within one
    /// 100 ms rate-limiter slice.
    SetSpeed {
        /// The job's id or control socket path.
        job: String,
        /// Bytes per second, in --speed's syntax (K, M, G suffixes); 0 = unlimited.
        rate: String,
    },
    /// Pause a job at a chunk boundary with everything copied committed (block-job-pause);
    /// returns once it is paused, after which killing the job is safe.
    Pause {
        /// The job's id or control socket path.
        job: String,
    },
    /// Resume a paused job (block-job-resume).
    Resume {
        /// The job's id or control socket path.
        job: String,
    },
    /// Cancel a job as Ctrl-C does (block-job-cancel): it commits what it copied and exits
    /// 130; running its command again resumes. Returns once the job has stopped.
    Cancel {
        /// The job's id or control socket path.
        job: String,
    },
    /// Wait until a job ends; the exit status is the job's (0 completed, 130 cancelled,
    /// 1 failed).
    Wait {
        /// Print the job's events as JSON lines on stdout as they come.
        #[arg(long)]
        events: bool,
        /// The job's id or control socket path.
        job: String,
    },
}

/// `--preallocation` of resize, qemu's modes.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum PreallocArg {
    /// Nothing allocated: the new range reads zeros and takes no space.
    Off,
    /// qcow2: tables and clusters allocated, the data left a hole in the file.
    Metadata,
    /// The space reserved (cowimg writes zeros, which reserves it as well).
    Falloc,
    /// Zeros written over the new range.
    Full,
}

impl From<PreallocArg> for Prealloc {
    fn from(p: PreallocArg) -> Prealloc {
        match p {
            PreallocArg::Off => Prealloc::Off,
            PreallocArg::Metadata => Prealloc::Metadata,
            PreallocArg::Falloc => Prealloc::Falloc,
            PreallocArg::Full => Prealloc::Full,
        }
    }
}
