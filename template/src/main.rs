//! The service's single binary: `serve`, `worker`, `migrate`, `create-user`, `openapi`.

use std::io::BufRead;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use service::auth::password::Password;
use service::config::Config;
use service::users::{self, Email, Role};
use service::{db, jobs, server, shutdown, telemetry, worker};

/// mimalloc rather than the system allocator. A request through the middleware stack allocates
/// dozens of times (header values, extensions, strings) on whichever thread runs it;
/// measured against glibc's allocator, the same build serves about 20% more reads a second
/// (`docs/benchmarks.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The variable `create-user` reads the password from when set; otherwise it reads one line from
/// standard input. Never from the command line, where `ps` and shell history would show it.
const PASSWORD_VARIABLE: &str = "CREATE_USER_PASSWORD";

#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Service(ServiceCommand),
    /// Print the OpenAPI document and exit; needs no configuration.
    Openapi,
}

/// The commands that read the configuration and use the database.
#[derive(Debug, Subcommand)]
enum ServiceCommand {
    /// Serve the public API and the admin listener until SIGTERM or Ctrl-C.
    Serve,
    /// Run background jobs until SIGTERM or Ctrl-C.
    Worker,
    /// Apply pending database migrations, then exit.
    Migrate,
    /// Create a user. The password comes from CREATE_USER_PASSWORD or, if unset, from stdin.
    CreateUser {
        #[arg(long)]
        email: String,
        #[arg(long, value_enum)]
        role: Role,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let command = match Cli::parse().command {
        Command::Service(command) => command,
        Command::Openapi => return print_openapi(),
    };
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprint!("{error}");
            return ExitCode::from(2);
        }
    };
    let tracer = telemetry::init(&config.log);
    let _sentry = telemetry::init_sentry(&config.log, config.environment);
    let outcome = run(command, config).await;
    // Flush the spans still buffered; blocking, so off the async threads.
    let _ = tokio::task::spawn_blocking(move || tracer.shutdown()).await;
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "exiting after an error");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: ServiceCommand, config: Config) -> anyhow::Result<()> {
    let db = db::pool(&config.database).context("DATABASE_URL is not a valid Postgres URL")?;
    match command {
        ServiceCommand::Serve => {
            server::Application::build(&config, db)
                .await?
                .run_until(shutdown::signal())
                .await
        }
        ServiceCommand::Worker => worker::run(db, config).await,
        ServiceCommand::Migrate => {
            let db = db::migration_pool(&config.database)
                .await
                .context("cannot connect to DATABASE_URL")?;
            db::MIGRATOR.run(&db).await.context("migration failed")?;
            jobs::migrate(&db)
                .await
                .context("creating the job queue's tables failed")?;
            tracing::info!("migrations applied");
            Ok(())
        }
        ServiceCommand::CreateUser { email, role } => {
            let email = Email::parse(&email).context("--email")?;
            let password = Password::parse(read_password()?).context("password")?;
            let id = users::create(&db, &email, role, password).await?;
            tracing::info!(user_id = %id, %email, role = role.as_str(), "user created");
            Ok(())
        }
    }
}

fn print_openapi() -> ExitCode {
    match service::app::openapi_document().to_pretty_json() {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("cannot serialise the OpenAPI document: {error}");
            ExitCode::FAILURE
        }
    }
}

fn read_password() -> anyhow::Result<String> {
    if let Ok(password) = std::env::var(PASSWORD_VARIABLE) {
        return Ok(password);
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("cannot read the password from stdin")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}
