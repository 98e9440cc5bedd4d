# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_cowimg_global_optspecs
    string join \n ca-file= h/help V/version
end

function __fish_cowimg_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_cowimg_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_cowimg_using_subcommand
    set -l cmd (__fish_cowimg_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c cowimg -n "__fish_cowimg_needs_command" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_needs_command" -s h -l help -d 'Print help'
complete -c cowimg -n "__fish_cowimg_needs_command" -s V -l version -d 'Print version'
complete -c cowimg -n "__fish_cowimg_needs_command" -f -a "create" -d 'Create a new image, optionally over a backing file'
complete -c cowimg -n "__fish_cowimg_needs_command" -f -a "info" -d 'Show an image\'s format, size, backing file and format-specific facts'
complete -c cowimg -n "__fish_cowimg_needs_command" -f -a "check" -d 'Check an image\'s metadata for errors and leaks, optionally repairing them'
complete -c cowimg -n "__fish_cowimg_needs_command" -f -a "map" -d 'Show where each guest range of an image comes from'
complete -c cowimg -n "__fish_cowimg_needs_command" -f -a "compare" -d 'Compare the guest contents of two images'
complete -c cowimg -n "__fish_cowimg_needs_command" -f -a "checksum" -d 'Print a digest of each image\'s guest disk: the same for raw, qcow2 and QED images holding the same bytes, whatever their layout; blksum computes the same digest. Each image is a job that \'cowimg job\' steers (set-speed caps the bytes read per second)'
complete -c cowimg -n "__fish_cowimg_needs_command" -f -a "stream" -d 'Copy into FILE what its backing chain provides above BASE, then make BASE its backing file (none without --base). Safe to interrupt; running it again resumes. Runs as a job: \'cowimg job\' queries, re-caps, pauses, cancels or waits for it (docs/jobs.md)'
complete -c cowimg -n "__fish_cowimg_needs_command" -f -a "serve" -d 'Export an image over NBD (qemu-nbd\'s options), copying what clients read from the backing chain into the image when it has the copy-on-read flag (or --copy-on-read). SIGINT/SIGTERM: stop accepting, finish requests in flight, commit, exit 0'
complete -c cowimg -n "__fish_cowimg_needs_command" -f -a "rebase" -d 'Point an image at a new backing file. Safe by default: data that would read differently is copied into the image first (parallel, resumable, a job that \'cowimg job\' steers); -u only changes the pointer'
complete -c cowimg -n "__fish_cowimg_needs_command" -f -a "commit" -d 'Write TOP\'s data into its backing file (or BASE further down), then empty TOP (qcow2), as qemu-img commit. The chain above reads the same throughout; safe to interrupt, and running it again finishes. Runs as a job that \'cowimg job\' steers'
complete -c cowimg -n "__fish_cowimg_needs_command" -f -a "resize" -d 'Change an image\'s virtual size, as qemu-img resize: SIZE, +SIZE or -SIZE. Shrinking needs --shrink and drops the data past the new end'
complete -c cowimg -n "__fish_cowimg_needs_command" -f -a "measure" -d 'How big a new image made from FILE (or of --size) would be'
complete -c cowimg -n "__fish_cowimg_needs_command" -f -a "amend" -d 'Change options of an existing image in place (crash-safe)'
complete -c cowimg -n "__fish_cowimg_needs_command" -f -a "snapshot" -d 'List, create, apply or delete a qcow2 image\'s internal snapshots, as qemu-img snapshot'
complete -c cowimg -n "__fish_cowimg_needs_command" -f -a "reset" -d 'Empty an overlay so it reads as its backing file again, keeping its options (atomic)'
complete -c cowimg -n "__fish_cowimg_needs_command" -f -a "job" -d 'Watch and steer running jobs (stream, rebase, commit, convert, checksum) over their control sockets: list, query, set-speed, pause, resume, cancel, wait. JOB is a job id (a socket in $XDG_RUNTIME_DIR/cowimg/, else /tmp/cowimg-$UID/) or the path of a --control socket; docs/jobs.md describes the protocol'
complete -c cowimg -n "__fish_cowimg_needs_command" -f -a "convert" -d 'Write an image\'s guest contents (through its chain) to a new standalone image. Runs as a job that \'cowimg job\' steers (its default id is DST\'s file name)'
complete -c cowimg -n "__fish_cowimg_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c cowimg -n "__fish_cowimg_using_subcommand create" -s f -l format -d 'Image format: qcow2, qed or raw' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand create" -s b -l backing -d 'Backing file (stored as given; a relative name is relative to FILE\'s directory)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand create" -s F -l backing-format -d 'Format of the backing file (required with -b, as in qemu-img)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand create" -s o -l options -d 'Format options, qemu-img style: cluster_size=64K,compat=v3,lazy_refcounts=on,...' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand create" -l cluster-size -d 'Cluster size (same as -o cluster_size=)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand create" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand create" -l copy-on-read -d 'Store cowimg\'s copy-on-read flag: reads through cowimg copy backing data in'
complete -c cowimg -n "__fish_cowimg_using_subcommand create" -s u -d 'Do not open the backing file (then SIZE is required)'
complete -c cowimg -n "__fish_cowimg_using_subcommand create" -l force -d 'Replace FILE if it exists (refused by default)'
complete -c cowimg -n "__fish_cowimg_using_subcommand create" -s q -l quiet -d 'Print nothing on success (no "Formatting ..." line)'
complete -c cowimg -n "__fish_cowimg_using_subcommand create" -s h -l help -d 'Print help'
complete -c cowimg -n "__fish_cowimg_using_subcommand info" -s f -l format -d 'Format of FILE (qcow2, qed or raw); probed from its contents when absent' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand info" -l output -d 'Output format: human or json' -r -f -a "human\t'Text for people, laid out as qemu-img lays it out'
json\t'One JSON document on stdout, with qemu-img\'s keys'"
complete -c cowimg -n "__fish_cowimg_using_subcommand info" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand info" -l backing-chain -d 'Show every image of the backing chain'
complete -c cowimg -n "__fish_cowimg_using_subcommand info" -s U -l force-share -d 'Read even if another process is writing the image (force share)'
complete -c cowimg -n "__fish_cowimg_using_subcommand info" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c cowimg -n "__fish_cowimg_using_subcommand check" -s f -l format -d 'Format of FILE (qcow2, qed or raw); probed from its contents when absent' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand check" -s r -l repair -d 'Repair: `leaks` frees leaked clusters, `all` fixes errors too' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand check" -l output -d 'Output format: human or json' -r -f -a "human\t'Text for people, laid out as qemu-img lays it out'
json\t'One JSON document on stdout, with qemu-img\'s keys'"
complete -c cowimg -n "__fish_cowimg_using_subcommand check" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand check" -s q -l quiet -d 'Print nothing; the exit status tells the result (0 clean, 2 corrupt, 3 leaks)'
complete -c cowimg -n "__fish_cowimg_using_subcommand check" -s U -l force-share -d 'Check even if another process is writing the image (results may be stale)'
complete -c cowimg -n "__fish_cowimg_using_subcommand check" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c cowimg -n "__fish_cowimg_using_subcommand map" -s f -l format -d 'Format of FILE (qcow2, qed or raw); probed from its contents when absent' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand map" -l output -d 'Output format: human or json' -r -f -a "human\t'Text for people, laid out as qemu-img lays it out'
json\t'One JSON document on stdout, with qemu-img\'s keys'"
complete -c cowimg -n "__fish_cowimg_using_subcommand map" -l start-offset -d 'Guest offset to start mapping at (K, M, G, T suffixes)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand map" -l max-length -d 'Map at most this many bytes from --start-offset (default: to the end)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand map" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand map" -s U -l force-share -d 'Read even if another process is writing the image (force share)'
complete -c cowimg -n "__fish_cowimg_using_subcommand map" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c cowimg -n "__fish_cowimg_using_subcommand compare" -s f -d 'Format of A (qcow2, qed or raw); probed when absent' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand compare" -s F -d 'Format of B (qcow2, qed or raw); probed when absent' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand compare" -l max -d 'With --diff: stop after this many ranges' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand compare" -l output -d 'With --diff: output format, human or json' -r -f -a "human\t'Text for people, laid out as qemu-img lays it out'
json\t'One JSON document on stdout, with qemu-img\'s keys'"
complete -c cowimg -n "__fish_cowimg_using_subcommand compare" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand compare" -s s -d 'Strict: sizes and allocation must match too'
complete -c cowimg -n "__fish_cowimg_using_subcommand compare" -s q -d 'Print nothing; the exit status tells (0 identical, 1 different, 2 error)'
complete -c cowimg -n "__fish_cowimg_using_subcommand compare" -s U -l force-share -d 'Read even if another process is writing the images (force share)'
complete -c cowimg -n "__fish_cowimg_using_subcommand compare" -l copy-on-read -d 'Copy what each image\'s backing chain provides into it as it is read (opens it read-write). Without it both images are only read, flagged copy-on-read or not'
complete -c cowimg -n "__fish_cowimg_using_subcommand compare" -l no-copy-on-read -d 'Accepted for compatibility and does nothing: reading never copies without --copy-on-read'
complete -c cowimg -n "__fish_cowimg_using_subcommand compare" -l diff -d 'List every differing range (offset, length, what each side holds), not only the first offset'
complete -c cowimg -n "__fish_cowimg_using_subcommand compare" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c cowimg -n "__fish_cowimg_using_subcommand checksum" -s f -l format -d 'Format of the images (qcow2, qed or raw); probed from each one\'s contents when absent' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand checksum" -s a -l algorithm -d 'Digest algorithm: sha1, sha224, sha256, sha384, sha512, sha512-224, sha512-256' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand checksum" -l jobs -d 'Hashing threads (default: number of cores)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand checksum" -l output -d 'Output format: human (DIGEST  FILENAME lines) or json' -r -f -a "human\t'Text for people, laid out as qemu-img lays it out'
json\t'One JSON document on stdout, with qemu-img\'s keys'"
complete -c cowimg -n "__fish_cowimg_using_subcommand checksum" -l job-id -d 'The job\'s id, for \'cowimg job ...\' (default: the image\'s file name, with -2, -3, ... added while a job of that name runs)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand checksum" -l control -d 'The job\'s control socket (default: $XDG_RUNTIME_DIR/cowimg/ID.sock, else /tmp/cowimg-$UID/ID.sock)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand checksum" -l events -d 'Write the job\'s events (created, running, paused, resumed, speed-changed, completed, cancelled, error) as JSON lines to FILE, or stdout with \'-\'' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand checksum" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand checksum" -s p -d 'Show a progress bar even when stderr is not a terminal'
complete -c cowimg -n "__fish_cowimg_using_subcommand checksum" -s U -l force-share -d 'Read even if another process is writing the images (force share)'
complete -c cowimg -n "__fish_cowimg_using_subcommand checksum" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c cowimg -n "__fish_cowimg_using_subcommand stream" -s f -l format -d 'Format of FILE (qcow2 or qed); probed from its contents when absent' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand stream" -s b -l base -d 'The backing file to keep (matched by resolved path); default: none' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand stream" -l speed -d 'Cap on bytes copied per second, or read over the network where more (K, M, G suffixes; 0 = unlimited)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand stream" -l jobs -d 'Copy workers (default: number of cores; at least 8 for an NBD source, 16 for HTTP(S))' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand stream" -l progress -d 'Progress as JSON lines on stderr: --progress json' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand stream" -l output -d 'Output format of the result: human or json' -r -f -a "human\t'Text for people, laid out as qemu-img lays it out'
json\t'One JSON document on stdout, with qemu-img\'s keys'"
complete -c cowimg -n "__fish_cowimg_using_subcommand stream" -l offset -d 'Stream only the range starting here (never changes the backing file)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand stream" -l length -d 'Length of the range to stream' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand stream" -l job-id -d 'The job\'s id, for \'cowimg job ...\' (default: the image\'s file name, with -2, -3, ... added while a job of that name runs)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand stream" -l control -d 'The job\'s control socket (default: $XDG_RUNTIME_DIR/cowimg/ID.sock, else /tmp/cowimg-$UID/ID.sock)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand stream" -l events -d 'Write the job\'s events (created, running, paused, resumed, speed-changed, completed, cancelled, error) as JSON lines to FILE, or stdout with \'-\'' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand stream" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand stream" -s p -d 'Show a progress bar even when stderr is not a terminal'
complete -c cowimg -n "__fish_cowimg_using_subcommand stream" -s c -l compress -d 'Write the copied clusters compressed (qcow2), for an archive-ready image'
complete -c cowimg -n "__fish_cowimg_using_subcommand stream" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c cowimg -n "__fish_cowimg_using_subcommand serve" -s f -l format -d 'Format of IMAGE; probed from its contents when absent' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand serve" -s k -l socket -d 'Listen on this Unix socket (instead of TCP)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand serve" -s b -l bind -d 'Address to listen on (TCP)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand serve" -s p -l port -d 'TCP port to listen on' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand serve" -s x -l export-name -d 'The export\'s name (clients asking for the empty name get it too)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand serve" -s D -l description -d 'Description shown to clients (nbdinfo)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand serve" -s e -l shared -d 'Clients served at once (more wait to be accepted)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand serve" -l pid-file -d 'Write the server\'s process id to this file once it listens' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand serve" -l base -d 'With --stream: the backing file to keep (matched by resolved path); default: none' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand serve" -l speed -d 'With --stream: cap on bytes streamed per second (K, M, G suffixes; 0 = unlimited)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand serve" -l handshake-limit -d 'Seconds a client has to finish the handshake before it is dropped (0: no limit), so that a client sending nothing cannot hold an -e slot' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand serve" -l job-id -d 'The job\'s id, for \'cowimg job ...\' (default: the image\'s file name, with -2, -3, ... added while a job of that name runs)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand serve" -l control -d 'The job\'s control socket (default: $XDG_RUNTIME_DIR/cowimg/ID.sock, else /tmp/cowimg-$UID/ID.sock)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand serve" -l events -d 'Write the job\'s events (created, running, paused, resumed, speed-changed, completed, cancelled, error) as JSON lines to FILE, or stdout with \'-\'' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand serve" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand serve" -s r -l read-only -d 'Refuse client writes (copy-on-read still fills the image)'
complete -c cowimg -n "__fish_cowimg_using_subcommand serve" -l copy-on-read -d 'Copy what clients read from the backing chain into IMAGE, whatever its flag says'
complete -c cowimg -n "__fish_cowimg_using_subcommand serve" -l no-copy-on-read -d 'Never copy on read, whatever the image\'s flag says'
complete -c cowimg -n "__fish_cowimg_using_subcommand serve" -s t -l persistent -d 'Keep serving after the last client disconnects (until SIGINT/SIGTERM)'
complete -c cowimg -n "__fish_cowimg_using_subcommand serve" -l stream -d 'While serving, copy into IMAGE what its backing chain provides (down to --base), never over what clients wrote; then switch its backing file to --base (or none) without disturbing clients. Stopped, it commits what it copied; run again, it resumes. Without -t the server exits once the stream is done and clients have left. The stream is a job: \'cowimg job\' steers it (--job-id, --control, --events)'
complete -c cowimg -n "__fish_cowimg_using_subcommand serve" -s h -l help -d 'Print help'
complete -c cowimg -n "__fish_cowimg_using_subcommand rebase" -s f -l format -d 'Format of FILE (qcow2 or qed); probed from its contents when absent' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand rebase" -s b -l backing -d 'The new backing file, stored as given (relative to FILE\'s directory); "" for none' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand rebase" -s F -l backing-format -d 'Format of the new backing file (required with a non-empty -b)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand rebase" -l speed -d 'Cap on bytes copied per second, or read over the network where more (K, M, G suffixes; 0 = unlimited)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand rebase" -l jobs -d 'Copy workers (default: number of cores; at least 8 for an NBD source, 16 for HTTP(S))' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand rebase" -l progress -d 'Progress as JSON lines on stderr: --progress json' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand rebase" -l output -d 'Output format of the result: human or json' -r -f -a "human\t'Text for people, laid out as qemu-img lays it out'
json\t'One JSON document on stdout, with qemu-img\'s keys'"
complete -c cowimg -n "__fish_cowimg_using_subcommand rebase" -l job-id -d 'The job\'s id, for \'cowimg job ...\' (default: the image\'s file name, with -2, -3, ... added while a job of that name runs)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand rebase" -l control -d 'The job\'s control socket (default: $XDG_RUNTIME_DIR/cowimg/ID.sock, else /tmp/cowimg-$UID/ID.sock)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand rebase" -l events -d 'Write the job\'s events (created, running, paused, resumed, speed-changed, completed, cancelled, error) as JSON lines to FILE, or stdout with \'-\'' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand rebase" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand rebase" -s u -d 'Unsafe: change only the pointer (the new backing file need not exist)'
complete -c cowimg -n "__fish_cowimg_using_subcommand rebase" -s p -d 'Show a progress bar even when stderr is not a terminal'
complete -c cowimg -n "__fish_cowimg_using_subcommand rebase" -s U -l force-share -d 'Open the new backing file shared (it may be in use elsewhere)'
complete -c cowimg -n "__fish_cowimg_using_subcommand rebase" -s c -l compress -d 'Write the copied clusters compressed (qcow2)'
complete -c cowimg -n "__fish_cowimg_using_subcommand rebase" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c cowimg -n "__fish_cowimg_using_subcommand commit" -s f -l format -d 'Format of TOP (qcow2, qed or raw); probed from its contents when absent' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand commit" -s b -l base -d 'The image to commit into (in TOP\'s backing chain; default: TOP\'s backing file). Implies -d; the images between BASE and TOP no longer read as before' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand commit" -s r -l speed -d 'Cap on bytes copied per second, or read over the network where more (K, M, G suffixes; 0 = unlimited)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand commit" -l jobs -d 'Copy workers (default: number of cores; at least 8 for an NBD source, 16 for HTTP(S))' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand commit" -l progress -d 'Progress as JSON lines on stderr: --progress json' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand commit" -l output -d 'Output format of the result: human or json' -r -f -a "human\t'Text for people, laid out as qemu-img lays it out'
json\t'One JSON document on stdout, with qemu-img\'s keys'"
complete -c cowimg -n "__fish_cowimg_using_subcommand commit" -l job-id -d 'The job\'s id, for \'cowimg job ...\' (default: the image\'s file name, with -2, -3, ... added while a job of that name runs)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand commit" -l control -d 'The job\'s control socket (default: $XDG_RUNTIME_DIR/cowimg/ID.sock, else /tmp/cowimg-$UID/ID.sock)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand commit" -l events -d 'Write the job\'s events (created, running, paused, resumed, speed-changed, completed, cancelled, error) as JSON lines to FILE, or stdout with \'-\'' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand commit" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand commit" -s d -l drop -d 'Keep TOP\'s data: skip emptying it after the commit (qemu-img\'s -d, --drop)'
complete -c cowimg -n "__fish_cowimg_using_subcommand commit" -s p -d 'Show a progress bar'
complete -c cowimg -n "__fish_cowimg_using_subcommand commit" -s q -d 'Print nothing on success'
complete -c cowimg -n "__fish_cowimg_using_subcommand commit" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c cowimg -n "__fish_cowimg_using_subcommand resize" -s f -l format -d 'Format of FILE (qcow2, qed or raw); probed from its contents when absent' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand resize" -l preallocation -d 'How the grown range is provided: off, metadata (qcow2), falloc or full' -r -f -a "off\t'Nothing allocated: the new range reads zeros and takes no space'
metadata\t'qcow2: tables and clusters allocated, the data left a hole in the file'
falloc\t'The space reserved (cowimg writes zeros, which reserves it as well)'
full\t'Zeros written over the new range'"
complete -c cowimg -n "__fish_cowimg_using_subcommand resize" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand resize" -l shrink -d 'Allow the new size to be smaller (the data past it is lost)'
complete -c cowimg -n "__fish_cowimg_using_subcommand resize" -s q -d 'Print nothing on success'
complete -c cowimg -n "__fish_cowimg_using_subcommand resize" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c cowimg -n "__fish_cowimg_using_subcommand measure" -s f -l format -d 'Format of FILE (qcow2, qed or raw); probed from its contents when absent' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand measure" -s O -d 'Output format: qcow2, qed or raw' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand measure" -s o -d 'Options of the output format, as for create: cluster_size=2M,extended_l2=on,...' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand measure" -l size -d 'Measure an empty image of this size instead of FILE' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand measure" -l output -d 'Output format of the result: human or json' -r -f -a "human\t'Text for people, laid out as qemu-img lays it out'
json\t'One JSON document on stdout, with qemu-img\'s keys'"
complete -c cowimg -n "__fish_cowimg_using_subcommand measure" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand measure" -s c -d 'Estimate the compressed size (qcow2) from a sample of FILE'
complete -c cowimg -n "__fish_cowimg_using_subcommand measure" -s U -l force-share -d 'Read even if another process is writing the image (force share)'
complete -c cowimg -n "__fish_cowimg_using_subcommand measure" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c cowimg -n "__fish_cowimg_using_subcommand amend" -s o -d 'qemu-img\'s options (qcow2): compat=0.10|1.1 (v2 or v3; a downgrade expands zero clusters), refcount_bits=1|2|4|...|64 (v3), lazy_refcounts=on|off (v3); the others (size, backing_file, ...) are not changed by cowimg amend yet' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand amend" -s f -l format -d 'Format of FILE (qcow2 or qed); probed from its contents when absent' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand amend" -l copy-on-read -d 'Set or clear cowimg\'s copy-on-read flag (qcow2, qed)' -r -f -a "on\t''
off\t''"
complete -c cowimg -n "__fish_cowimg_using_subcommand amend" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand amend" -s h -l help -d 'Print help'
complete -c cowimg -n "__fish_cowimg_using_subcommand snapshot" -s c -d 'Create a snapshot of the current state named NAME' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand snapshot" -s a -d 'Apply (revert to) the snapshot with this ID or name: data and size' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand snapshot" -s d -d 'Delete the (first) snapshot with this name' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand snapshot" -s f -l format -d 'Format of FILE (qcow2, qed or raw); probed from its contents when absent' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand snapshot" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand snapshot" -s l -l list -d 'List the snapshots (the default)'
complete -c cowimg -n "__fish_cowimg_using_subcommand snapshot" -s U -l force-share -d 'Read even if another process is writing the image (force share; -l only)'
complete -c cowimg -n "__fish_cowimg_using_subcommand snapshot" -s q -d 'Quiet (accepted as in qemu-img; the changes print nothing anyway)'
complete -c cowimg -n "__fish_cowimg_using_subcommand snapshot" -s h -l help -d 'Print help'
complete -c cowimg -n "__fish_cowimg_using_subcommand reset" -s f -l format -d 'Format of FILE (qcow2 or qed); probed from its contents when absent' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand reset" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand reset" -s h -l help -d 'Print help'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and not __fish_seen_subcommand_from list query set-speed pause resume cancel wait help" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and not __fish_seen_subcommand_from list query set-speed pause resume cancel wait help" -s h -l help -d 'Print help'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and not __fish_seen_subcommand_from list query set-speed pause resume cancel wait help" -f -a "list" -d 'List the running jobs of this user'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and not __fish_seen_subcommand_from list query set-speed pause resume cancel wait help" -f -a "query" -d 'Show a job\'s state, cur/end, bytes copied, current speed, cap, elapsed time and ETA'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and not __fish_seen_subcommand_from list query set-speed pause resume cancel wait help" -f -a "set-speed" -d 'Change a job\'s speed cap while it runs (block-job-set-speed); it applies within one 100 ms rate-limiter slice'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and not __fish_seen_subcommand_from list query set-speed pause resume cancel wait help" -f -a "pause" -d 'Pause a job at a chunk boundary with everything copied committed (block-job-pause); returns once it is paused, after which killing the job is safe'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and not __fish_seen_subcommand_from list query set-speed pause resume cancel wait help" -f -a "resume" -d 'Resume a paused job (block-job-resume)'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and not __fish_seen_subcommand_from list query set-speed pause resume cancel wait help" -f -a "cancel" -d 'Cancel a job as Ctrl-C does (block-job-cancel): it commits what it copied and exits 130; running its command again resumes. Returns once the job has stopped'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and not __fish_seen_subcommand_from list query set-speed pause resume cancel wait help" -f -a "wait" -d 'Wait until a job ends; the exit status is the job\'s (0 completed, 130 cancelled, 1 failed)'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and not __fish_seen_subcommand_from list query set-speed pause resume cancel wait help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from list" -l output -d 'Output format: human or json' -r -f -a "human\t'Text for people, laid out as qemu-img lays it out'
json\t'One JSON document on stdout, with qemu-img\'s keys'"
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from list" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from query" -l output -d 'Output format: human or json (query-block-jobs\' entry)' -r -f -a "human\t'Text for people, laid out as qemu-img lays it out'
json\t'One JSON document on stdout, with qemu-img\'s keys'"
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from query" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from query" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from set-speed" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from set-speed" -s h -l help -d 'Print help'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from pause" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from pause" -s h -l help -d 'Print help'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from resume" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from resume" -s h -l help -d 'Print help'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from cancel" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from cancel" -s h -l help -d 'Print help'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from wait" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from wait" -l events -d 'Print the job\'s events as JSON lines on stdout as they come'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from wait" -s h -l help -d 'Print help'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from help" -f -a "list" -d 'List the running jobs of this user'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from help" -f -a "query" -d 'Show a job\'s state, cur/end, bytes copied, current speed, cap, elapsed time and ETA'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from help" -f -a "set-speed" -d 'Change a job\'s speed cap while it runs (block-job-set-speed); it applies within one 100 ms rate-limiter slice'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from help" -f -a "pause" -d 'Pause a job at a chunk boundary with everything copied committed (block-job-pause); returns once it is paused, after which killing the job is safe'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from help" -f -a "resume" -d 'Resume a paused job (block-job-resume)'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from help" -f -a "cancel" -d 'Cancel a job as Ctrl-C does (block-job-cancel): it commits what it copied and exits 130; running its command again resumes. Returns once the job has stopped'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from help" -f -a "wait" -d 'Wait until a job ends; the exit status is the job\'s (0 completed, 130 cancelled, 1 failed)'
complete -c cowimg -n "__fish_cowimg_using_subcommand job; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -s f -d 'Format of SRC (qcow2, qed or raw); probed from its contents when absent' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -s O -d 'Output format: raw, qcow2 or qed' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -s o -d 'Options of the output format, as for create: cluster_size=2M,compression_type=zstd,...' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -l progress -d 'Progress as JSON lines on stderr: --progress json' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -l jobs -d 'Copy workers (default: number of cores; at least 8 for an NBD source, 16 for HTTP(S))' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -s B -l backing -d 'Make DST an overlay of BACKING holding only what SRC\'s top layer holds (as qemu-img: SRC\'s own backing chain is assumed to read as BACKING does)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -s F -l backing-format -d 'Format of BACKING (required with -B, as qemu-img requires it)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -s S -l sparse-size -d 'Zeros must run this long (a multiple of 512, up to 16M) to be left as holes; 0 writes every byte (a fully allocated DST). Default: every zero allocation unit' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -s r -l speed -d 'Cap on bytes copied per second, or read over the network where more (K, M, G suffixes; 0 = unlimited)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -s m -l parallel -d 'Parallel requests, as qemu-img\'s coroutines (1 to 16): the copy workers, unless --jobs is given' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -s t -l target-cache -d 'Accepted for qemu-img compatibility (none, writeback, writethrough, directsync, unsafe): cowimg writes through the page cache and syncs DST before exit 0 whatever the mode' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -s T -l source-cache -d 'Accepted for qemu-img compatibility (as -t): sources are read through the page cache' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -s l -l source-snapshot -d 'Read SRC as its internal snapshot holds it (qcow2): an id or a name, or snapshot.id=ID,snapshot.name=NAME, as qemu-img takes it' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -l job-id -d 'The job\'s id, for \'cowimg job ...\' (default: the image\'s file name, with -2, -3, ... added while a job of that name runs)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -l control -d 'The job\'s control socket (default: $XDG_RUNTIME_DIR/cowimg/ID.sock, else /tmp/cowimg-$UID/ID.sock)' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -l events -d 'Write the job\'s events (created, running, paused, resumed, speed-changed, completed, cancelled, error) as JSON lines to FILE, or stdout with \'-\'' -r
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -l ca-file -d 'Trust the CAs in this PEM file (instead of the system\'s, and of SSL_CERT_FILE) for https:// images and backing files: a private or test CA' -r -F
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -s p -d 'Show a progress bar'
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -s U -l force-share -d 'Read even if another process is writing SRC (force share)'
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -l copy-on-read -d 'Copy what the source\'s backing chain provides into the source as it is read (opens it read-write). Without it the source is only read, flagged or not'
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -l no-copy-on-read -d 'Accepted for compatibility and does nothing: reading never copies without --copy-on-read'
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -s c -d 'Compress clusters where they shrink (qcow2 output; -o compression_type=zlib|zstd)'
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -s n -d 'Write into the existing DST in place, creating nothing: DST must be an image of the -O format at least as large as SRC (bytes past SRC\'s size are kept)'
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -s W -l oob-writes -d 'Accepted for qemu-img compatibility: cowimg\'s workers always write out of order (the output is consistent only once it is complete, and appears then)'
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -s q -l quiet -d 'No progress bar, even with -p'
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -l target-is-zero -d 'With -n: DST reads as zeros already (a new export, a fresh device), so SRC\'s zero ranges are skipped instead of written'
complete -c cowimg -n "__fish_cowimg_using_subcommand convert" -s h -l help -d 'Print help'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and not __fish_seen_subcommand_from create info check map compare checksum stream serve rebase commit resize measure amend snapshot reset job convert help" -f -a "create" -d 'Create a new image, optionally over a backing file'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and not __fish_seen_subcommand_from create info check map compare checksum stream serve rebase commit resize measure amend snapshot reset job convert help" -f -a "info" -d 'Show an image\'s format, size, backing file and format-specific facts'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and not __fish_seen_subcommand_from create info check map compare checksum stream serve rebase commit resize measure amend snapshot reset job convert help" -f -a "check" -d 'Check an image\'s metadata for errors and leaks, optionally repairing them'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and not __fish_seen_subcommand_from create info check map compare checksum stream serve rebase commit resize measure amend snapshot reset job convert help" -f -a "map" -d 'Show where each guest range of an image comes from'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and not __fish_seen_subcommand_from create info check map compare checksum stream serve rebase commit resize measure amend snapshot reset job convert help" -f -a "compare" -d 'Compare the guest contents of two images'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and not __fish_seen_subcommand_from create info check map compare checksum stream serve rebase commit resize measure amend snapshot reset job convert help" -f -a "checksum" -d 'Print a digest of each image\'s guest disk: the same for raw, qcow2 and QED images holding the same bytes, whatever their layout; blksum computes the same digest. Each image is a job that \'cowimg job\' steers (set-speed caps the bytes read per second)'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and not __fish_seen_subcommand_from create info check map compare checksum stream serve rebase commit resize measure amend snapshot reset job convert help" -f -a "stream" -d 'Copy into FILE what its backing chain provides above BASE, then make BASE its backing file (none without --base). Safe to interrupt; running it again resumes. Runs as a job: \'cowimg job\' queries, re-caps, pauses, cancels or waits for it (docs/jobs.md)'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and not __fish_seen_subcommand_from create info check map compare checksum stream serve rebase commit resize measure amend snapshot reset job convert help" -f -a "serve" -d 'Export an image over NBD (qemu-nbd\'s options), copying what clients read from the backing chain into the image when it has the copy-on-read flag (or --copy-on-read). SIGINT/SIGTERM: stop accepting, finish requests in flight, commit, exit 0'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and not __fish_seen_subcommand_from create info check map compare checksum stream serve rebase commit resize measure amend snapshot reset job convert help" -f -a "rebase" -d 'Point an image at a new backing file. Safe by default: data that would read differently is copied into the image first (parallel, resumable, a job that \'cowimg job\' steers); -u only changes the pointer'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and not __fish_seen_subcommand_from create info check map compare checksum stream serve rebase commit resize measure amend snapshot reset job convert help" -f -a "commit" -d 'Write TOP\'s data into its backing file (or BASE further down), then empty TOP (qcow2), as qemu-img commit. The chain above reads the same throughout; safe to interrupt, and running it again finishes. Runs as a job that \'cowimg job\' steers'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and not __fish_seen_subcommand_from create info check map compare checksum stream serve rebase commit resize measure amend snapshot reset job convert help" -f -a "resize" -d 'Change an image\'s virtual size, as qemu-img resize: SIZE, +SIZE or -SIZE. Shrinking needs --shrink and drops the data past the new end'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and not __fish_seen_subcommand_from create info check map compare checksum stream serve rebase commit resize measure amend snapshot reset job convert help" -f -a "measure" -d 'How big a new image made from FILE (or of --size) would be'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and not __fish_seen_subcommand_from create info check map compare checksum stream serve rebase commit resize measure amend snapshot reset job convert help" -f -a "amend" -d 'Change options of an existing image in place (crash-safe)'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and not __fish_seen_subcommand_from create info check map compare checksum stream serve rebase commit resize measure amend snapshot reset job convert help" -f -a "snapshot" -d 'List, create, apply or delete a qcow2 image\'s internal snapshots, as qemu-img snapshot'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and not __fish_seen_subcommand_from create info check map compare checksum stream serve rebase commit resize measure amend snapshot reset job convert help" -f -a "reset" -d 'Empty an overlay so it reads as its backing file again, keeping its options (atomic)'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and not __fish_seen_subcommand_from create info check map compare checksum stream serve rebase commit resize measure amend snapshot reset job convert help" -f -a "job" -d 'Watch and steer running jobs (stream, rebase, commit, convert, checksum) over their control sockets: list, query, set-speed, pause, resume, cancel, wait. JOB is a job id (a socket in $XDG_RUNTIME_DIR/cowimg/, else /tmp/cowimg-$UID/) or the path of a --control socket; docs/jobs.md describes the protocol'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and not __fish_seen_subcommand_from create info check map compare checksum stream serve rebase commit resize measure amend snapshot reset job convert help" -f -a "convert" -d 'Write an image\'s guest contents (through its chain) to a new standalone image. Runs as a job that \'cowimg job\' steers (its default id is DST\'s file name)'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and not __fish_seen_subcommand_from create info check map compare checksum stream serve rebase commit resize measure amend snapshot reset job convert help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and __fish_seen_subcommand_from job" -f -a "list" -d 'List the running jobs of this user'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and __fish_seen_subcommand_from job" -f -a "query" -d 'Show a job\'s state, cur/end, bytes copied, current speed, cap, elapsed time and ETA'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and __fish_seen_subcommand_from job" -f -a "set-speed" -d 'Change a job\'s speed cap while it runs (block-job-set-speed); it applies within one 100 ms rate-limiter slice'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and __fish_seen_subcommand_from job" -f -a "pause" -d 'Pause a job at a chunk boundary with everything copied committed (block-job-pause); returns once it is paused, after which killing the job is safe'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and __fish_seen_subcommand_from job" -f -a "resume" -d 'Resume a paused job (block-job-resume)'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and __fish_seen_subcommand_from job" -f -a "cancel" -d 'Cancel a job as Ctrl-C does (block-job-cancel): it commits what it copied and exits 130; running its command again resumes. Returns once the job has stopped'
complete -c cowimg -n "__fish_cowimg_using_subcommand help; and __fish_seen_subcommand_from job" -f -a "wait" -d 'Wait until a job ends; the exit status is the job\'s (0 completed, 130 cancelled, 1 failed)'
